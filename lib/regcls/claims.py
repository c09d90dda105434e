"""The paper's claims beside this run's numbers: each chapter checks its claims and records them, and the
claims page collects the records."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from . import metrics
from .env import cache_dir, image_cap
from .files import LIB_ROOT, atomic_write_text, library_digest
from .profiles import Profile


# Sec. 4.1's line between "uses both the skip term and the patches" and "dominated by the skip term": the median
# ratio of the skip term's norm to the patch part's (4.1 and the appendix judge with it).
SKIP_DOMINATED = 3.0


@dataclass(frozen=True)
class Rule:
    """An agreement rule that writes its own text: what is compared, with this run's numbers, and the outcome.

    Build rules with :func:`above`, :func:`below`, :func:`within_factor`, :func:`interval_above`,
    :func:`monotone` and combine them with :func:`all_of`; a chapter never judges with a bare ``bool``.
    """

    text: str
    ok: bool


def above(name: str, x: float, bound: float, fmt: str = ".2f") -> Rule:
    return Rule(f"{name} {x:{fmt}} > {bound:{fmt}}", bool(x > bound))


def below(name: str, x: float, bound: float, fmt: str = ".2f") -> Rule:
    return Rule(f"{name} {x:{fmt}} < {bound:{fmt}}", bool(x < bound))


def within_factor(name: str, x: float, paper: float, factor: float) -> Rule:
    """``x`` within a factor of the paper's value (a log-scale band, for small quantities such as 1 - cos)."""
    return Rule(f"{name} {x:.2g} within {factor:g}x of the paper's {paper:.2g}",
                bool(paper / factor <= x <= paper * factor))


def interval_above(name: str, ci: tuple[float, float, float], bound: float, fmt: str = ".2f") -> Rule:
    """A bootstrap interval ``(value, low, high)`` lies above ``bound`` (paired differences: above an effect size)."""
    v, lo, hi = ci
    return Rule(f"{name} {v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}] above {bound:{fmt}}", bool(lo > bound))


def monotone(name: str, values: dict[str, float], increasing: bool = True, tol: float = 0.0,
             fmt: str = ".2f") -> Rule:
    """The values rise (or fall) in the order given (the paper's size order); with ``tol`` a step may go the
    other way by at most that much (two sizes that both sit at the ceiling, say)."""
    v = list(values.values())
    step = [b - a if increasing else a - b for a, b in zip(v, v[1:])]
    sign = " < " if increasing else " > "
    slack = f" (steps back of at most {tol:{fmt}} allowed)" if tol else ""
    return Rule(f"{name} {'rises' if increasing else 'falls'} with size: "
                + sign.join(f"{k} {x:{fmt}}" for k, x in values.items()) + slack,
                bool(len(v) > 1 and all((d > 0) if not tol else (d >= -tol) for d in step)))


def all_of(*rules: Rule) -> Rule:
    return Rule("; ".join(r.text for r in rules), all(r.ok for r in rules))


@dataclass
class ClaimCheck:
    """One claim of the paper, what the paper shows, what this run measured, and whether they agree.

    ``agrees`` is None when the profile lacks what the claim needs (e.g. the giant model on ``laptop``): such a
    row neither agrees nor disagrees; and None with ``status`` "not computed" when the row could not be computed
    on this machine (no iBOT checkpoint, say): not a failed replication either (:func:`verdict`).
    ``images_cap`` is the ``REGCLS_LIMIT`` the run was made under.
    """

    section: str
    claim: str
    paper: str     # the paper's number, or its qualitative finding (with figure)
    ours: str      # this run's number(s), with intervals
    agrees: bool | None
    profile: str
    images_cap: int | None = field(default_factory=image_cap)
    rule: str = ""  # the agreement rule with this run's numbers (Rule.text)
    stamp: str = field(default_factory=lambda: code_stamp())  # which code computed the row (commit, library)
    status: str = ""   # "not computed" where the row could not be computed here (with the reason in ``ours``)

    @property
    def stale(self) -> bool:
        """Recorded by other library code than the one running now: the chapter must run again."""
        return self.stamp.split(" ")[-1] != code_stamp().split(" ")[-1]


@functools.lru_cache(maxsize=1)
def code_stamp() -> str:
    """``"commit abc1234, library 0123456789abcdef"``: the git commit (when the library sits in a checkout) and a
    digest of every library file, so that a claim row says which code computed it. Worked out once per process:
    every row is stamped with it, and every row of the claims table compares its stamp with it."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=LIB_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"commit {commit}, library {library_digest()}"


VERDICTS = ("yes", "no", "not testable", "not computed")


def verdict(c: ClaimCheck) -> str:
    """The row's verdict in words: ``yes`` (agrees), ``no`` (does not), ``not testable`` (the profile lacks what the
    claim needs), ``not computed`` (what it needs could not be computed here)."""
    if c.agrees is None:
        return "not computed" if c.status == "not computed" else "not testable"
    return "yes" if c.agrees else "no"


def not_computed(section: str, claim: str, paper: str, why: str, profile: Profile) -> ClaimCheck:
    """A row whose numbers could not be computed on this machine (``why``: a missing checkpoint, say)."""
    return ClaimCheck(section, claim, paper, f"not computed: {why}", None, profile.name, status="not computed")


def check(section: str, claim: str, paper: str, ours, agrees, profile: Profile,
          needs: tuple[str, ...] = (), missing: list[str] | None = None) -> ClaimCheck:
    """A claim row; when ``profile`` lacks a model size in ``needs`` the row is "not testable" instead.

    ``ours`` is this run's numbers (text) and ``agrees`` a :class:`Rule`; either may be a function without
    arguments, called only when the profile has every size in ``needs`` (so that it may index them).
    ``needs`` names sizes of the DINOv2 models with registers (``("L", "g")``) the claim is about;
    ``missing`` gives the missing sizes directly (appendix families, :func:`regcls.profiles.appendix_missing`).
    """
    what = f"its DINOv2 sizes: {', '.join(profile.sizes(True))}"
    if missing is None:
        missing = [s for s in needs if s not in profile.sizes(True)]
    else:
        what = "the series' other sizes"
    if missing:
        measured = "" if callable(ours) else f" Measured: {ours}"
        return ClaimCheck(section, claim, paper, f"needs {', '.join(missing)}, which the {profile.name} profile "
                          f"does not have ({what}).{measured}", None, profile.name)
    ours = ours() if callable(ours) else ours
    agrees = agrees() if callable(agrees) else agrees
    rule = agrees.text if isinstance(agrees, Rule) else ""
    return ClaimCheck(section, claim, paper, ours, bool(agrees.ok if isinstance(agrees, Rule) else agrees),
                      profile.name, rule=rule)


# Sec. 3.3: "for the two smaller models, the patch-based representation shows close-to-perfect alignment with the
# [CLS] output". The paper gives no number; perfect alignment is CKA 1, and "close to perfect" is read as within 0.05
# of it. A bound of 0.9 would call an output a tenth of CKA's range away from perfect "close to perfect".
CLOSE_TO_PERFECT = 0.95


def knockout_checks(section: str, ko: dict[str, dict], profile: Profile, *, cka: dict | None = None,
                    n_boot: int = 300, drop: float = 0.3, prefix: str = "") -> list[ClaimCheck]:
    """The three claims of Fig. 3a, judged on knockout outputs ``ko[size]`` (:func:`regcls.metrics.knockout`, the
    same images in every size): S and B patch-only CKA above :data:`CLOSE_TO_PERFECT`; the patch-only CKA falls
    with size (monotone, and a paired drop from S to g of at least ``drop``); in g the register-only output matches
    better than the patch-only one (paired). ``cka[size][part]`` are CKA intervals when the chapter has them already;
    ``prefix`` starts each claim (another dataset, say)."""
    cka = cka or {s: metrics.knockout_cka(k, n_boot=n_boot) for s, k in ko.items()}
    cp = {s: c["patch"].value for s, c in cka.items()}

    @functools.cache   # each contrast is shown in the row and judged by its rule: computed once
    def paired(s1, p1, s2, p2):
        return metrics.cka_difference_interval(ko[s1]["full"], ko[s1][p1], ko[s2]["full"], ko[s2][p2], n_boot=n_boot)

    return [
        check(section, prefix + "Small models: the patch-only output matches the unaltered one (CKA close to 1)",
              f"S and B patch-only CKA close to 1: 'close-to-perfect alignment' (Sec. 3.3, Fig. 3a), read as above "
              f"{CLOSE_TO_PERFECT}",
              ", ".join(f"{s}: {c['patch'].value:.3f} [{c['patch'].low:.3f}, {c['patch'].high:.3f}]" for s, c in cka.items()),
              lambda: all_of(*(above(f"{s} patch-only CKA", cp[s], CLOSE_TO_PERFECT, ".3f") for s in ("S", "B"))),
              profile, needs=("S", "B")),
        check(section, prefix + "Patch-only CKA collapses as size grows", "qualitative (Fig. 3a)",
              lambda: "patch-only CKA: " + ", ".join(f"{s} {v:.3f}" for s, v in cp.items())
              + "; paired drop S - g {:.3f} [{:.3f}, {:.3f}]".format(*paired("S", "patch", "g", "patch")),
              lambda: all_of(monotone("patch-only CKA", cp, increasing=False, tol=0.02, fmt=".3f"),
                             interval_above("paired drop S - g", paired("S", "patch", "g", "patch"), drop, ".3f")),
              profile, needs=("S", "B", "L", "g")),
        check(section, prefix + "In giant, the register-only output matches better than the patch-only one",
              "qualitative (Fig. 3a)",
              lambda: "g: register {:.3f} vs patch {:.3f}; paired difference {:.3f} [{:.3f}, {:.3f}]".format(
                  cka["g"]["reg"].value, cp["g"], *paired("g", "reg", "g", "patch")),
              lambda: interval_above("paired register - patch CKA in g", paired("g", "reg", "g", "patch"), 0.0, ".3f"),
              profile, needs=("g",)),
    ]


# Sec. 3.1 and Sec. 3.3 (with the Sec. 5 claim recorded in 3.3): rows built here so that tests/test_claims.py
# judges each on both sides with synthetic numbers.

# Sec. 3.1: "the variance of preference for either register or patch tokens in the largest model is considerable,
# with some images attending mainly to patch tokens, and some almost ignoring them entirely". "Mainly": more than
# half of the attention goes to the patches; "almost ignoring them entirely": less than a tenth does. "Some images":
# at least one image in twenty at each end, so the 95th and the 5th percentile of the per-image patch share.
MAINLY = 0.5
ALMOST_NONE = 0.1
SOME_IMAGES = 5   # percent of the images at each end


def share_ends_check(section: str, patch: dict[str, np.ndarray], profile: Profile) -> ClaimCheck:
    """Fig. 2a's per-image variation in g, judged at both ends of the per-image patch share ``patch[size]``
    (:func:`regcls.metrics.part_share`): some images attend mainly to the patches (95th percentile above
    :data:`MAINLY`) and some almost ignore them (5th percentile below :data:`ALMOST_NONE`). A wide spread
    that stays inside (0.30-0.85, say) does not agree."""
    ends = {s: tuple(float(v) for v in np.percentile(x, [SOME_IMAGES, 100 - SOME_IMAGES])) for s, x in patch.items()}
    return check(section, "The giant model's share varies strongly across images (Fig. 2a)",
                 f"in g some images attend mainly to patches (patch share above {MAINLY}), others almost ignore them "
                 f"(below {ALMOST_NONE}); Sec. 3.1 text, Fig. 2a",
                 f"patch share, {SOME_IMAGES}th-{100 - SOME_IMAGES}th percentile over images: "
                 + ", ".join(f"{s} {lo:.2f}-{hi:.2f}" for s, (lo, hi) in ends.items()),
                 lambda: all_of(above(f"g: {100 - SOME_IMAGES}th percentile", ends["g"][1], MAINLY),
                                below(f"g: {SOME_IMAGES}th percentile", ends["g"][0], ALMOST_NONE)),
                 profile, needs=("g",))


# Sec. 5 (Limitations): "As we have seen that centered kernel alignment between register tokens and patch tokens is
# low". The paper gives no number; "low" is read as below the middle of CKA's range, nearer no alignment (0) than
# the "close-to-perfect" alignment (1) of Sec. 3.3. The Discussion names the giant model as the one whose global
# output does not correspond to its patch features.
LOW_CKA = 0.5


def register_patch_check(section: str, ko: dict[str, dict], profile: Profile, *, cka_rp: dict | None = None,
                         n_boot: int = 300) -> ClaimCheck:
    """Sec. 5's claim on knockout outputs ``ko[size]`` (:func:`regcls.metrics.knockout`): in g the register-only
    and the patch-only output have CKA below :data:`LOW_CKA` with each other. ``cka_rp[size]`` are the intervals
    (:func:`regcls.metrics.cka_interval` of the two parts) when the chapter has them already."""
    cka_rp = cka_rp or {s: metrics.cka_interval(k["reg"], k["patch"], n_boot=n_boot) for s, k in ko.items()}
    return check(section, "The register-only and patch-only outputs have low CKA with each other in giant (Sec. 5)",
                 f"'centered kernel alignment between register tokens and patch tokens is low' (Sec. 5); no number: "
                 f"read as below {LOW_CKA}",
                 "CKA register-only vs patch-only [95% CI]: "
                 + ", ".join(f"{s} {c.value:.3f} [{c.low:.3f}, {c.high:.3f}]" for s, c in cka_rp.items()),
                 lambda: below("g: CKA register-only vs patch-only", cka_rp["g"].value, LOW_CKA, ".3f"),
                 profile, needs=("g",))


def table(checks: list[ClaimCheck]):
    """A page table: claim, paper, this run, profile, verdict."""
    import pandas as pd

    df = pd.DataFrame([{"section": c.section, "claim": c.claim, "paper": c.paper, "this run": c.ours,
                        "rule (agrees if)": c.rule or "-", "profile": c.profile + (f" (capped at {c.images_cap} images)" if c.images_cap else ""),
                        "agrees": verdict(c) + (" (stale: other code, rerun the chapter)" if c.stale else ""),
                        "computed by": c.stamp} for c in checks])
    return df.style.hide(axis="index")


def record(chapter: str, checks: list[ClaimCheck]) -> None:
    """Save a chapter's checks (per profile) for the claims page."""
    profile = checks[0].profile if checks else "none"
    folder = cache_dir() / "claims" / profile
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{chapter}.json", json.dumps([asdict(c) for c in checks], indent=1))


def collect(profile: str) -> list[ClaimCheck]:
    """Every recorded check of one profile, in section order."""
    out = []
    for f in sorted((cache_dir() / "claims" / profile).glob("*.json")):
        out += [ClaimCheck(**d) for d in json.loads(f.read_text())]
    return sorted(out, key=lambda c: c.section)
