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


# A line between "uses both the skip term and the patches" and "dominated by the skip term": the median ratio of
# the skip term's norm to the patch part's (the appendix judges with it; 4.1 judges the giant against each smaller
# size on the same images instead, by SKIP_CONTRAST).
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


def knockout_checks(section: str, ko: dict[str, dict], profile: Profile, *, cka: dict | None = None,
                    n_boot: int = 300, drop: float = 0.3, prefix: str = "") -> list[ClaimCheck]:
    """The three claims of Fig. 3a, judged on knockout outputs ``ko[size]`` (:func:`regcls.metrics.knockout`, the
    same images in every size): S and B patch-only CKA above 0.9; the patch-only CKA falls with size (monotone,
    and a paired drop from S to g of at least ``drop``); in g the register-only output matches better than the
    patch-only one (paired). ``cka[size][part]`` are CKA intervals when the chapter has them already;
    ``prefix`` starts each claim (another dataset, say)."""
    cka = cka or {s: metrics.knockout_cka(k, n_boot=n_boot) for s, k in ko.items()}
    cp = {s: c["patch"].value for s, c in cka.items()}

    @functools.cache   # each contrast is shown in the row and judged by its rule: computed once
    def paired(s1, p1, s2, p2):
        return metrics.cka_difference_interval(ko[s1]["full"], ko[s1][p1], ko[s2]["full"], ko[s2][p2], n_boot=n_boot)

    return [
        check(section, prefix + "Small models: the patch-only output matches the unaltered one (CKA close to 1)",
              "S and B patch-only CKA close to 1 (Fig. 3a)",
              ", ".join(f"{s}: {c['patch'].value:.3f} [{c['patch'].low:.3f}, {c['patch'].high:.3f}]" for s, c in cka.items()),
              lambda: all_of(*(above(f"{s} patch-only CKA", cp[s], 0.9, ".3f") for s in ("S", "B"))),
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


# --- Sec. 4.1 (Figs. 5a, 5b, 6) and Sec. 3.4's orthogonal example: the giant against smaller sizes, paired ---

# How far apart, as a factor, the giant and each smaller DINOv2 must lie on the same images in 4.1's contrasts:
# "the three smaller models attend to both patch and skip features, but the 'giant' model output is strongly
# dominated by the skip features" (Fig. 5a); "the three smaller models exhibit a large jump at the very last layer
# ... the [CLS] token of the 'giant' model converges to the final output more smoothly" (Fig. 5b); "no evidence
# for disconnects" in S and B, a disconnect in g (Fig. 6, Sec. 5). Figs. 5-6 are plots without values and the text
# gives no number: two, a doubling, is the smallest gap we read as a difference of kind rather than of degree.
# It also says how far a size may step back in a trend and still count as level with the size before it.
SKIP_CONTRAST = 2.0
SMALLER = ("S", "B", "L")   # "the three smaller models" of Sec. 4.1
# "The similarity of the [CLS] token of the last layer and all previous layers is low for the smaller models",
# which "exhibit a large jump at the very last layer" (Sec. 4.1): the last block moves the [CLS] further than all
# the blocks before it together, i.e. makes more than half of its change along the depth (metrics.depth_changes).
JUMP_SHARE = 0.5
# In the giant "the penultimate output is already very similar to the final one" (Sec. 4.1): cosine above 0.9 (the
# bar at which metrics.integration_depth calls the [CLS] integrated).
VERY_SIMILAR = 0.9
# Sec. 3.4's example image: cosine -0.0092 between the patch-based and the full output, "completely orthogonal". An
# image counts as orthogonal at |cos| < 0.05 (within 3 degrees of a right angle).
ORTHOGONAL = 0.05


def rises_within(name: str, values: dict[str, float], factor: float, fmt: str = ".3g") -> Rule:
    """Positive values (a norm ratio) rise in the order given (the paper's size order), where a step back by less
    than ``factor`` counts as level: two sizes within that factor of each other are not told apart."""
    v = list(values.values())
    ok = len(v) > 1 and all(b > a / factor for a, b in zip(v, v[1:]))
    return Rule(f"{name} rises with size: " + " < ".join(f"{k} {x:{fmt}}" for k, x in values.items())
                + f" (steps back by less than {factor:g}x allowed)", bool(ok))


def paired_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = 300) -> metrics.Interval:
    """The median over the images of ``num / den`` image by image (two models on the same images), with its
    paired bootstrap interval: how many times larger one model's per-image value is than the other's."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny   # a zero denominator (a [CLS] that did not move) gives a huge ratio, not NaN
    return metrics.bootstrap_ci(lambda a, b: float(np.median(a / np.maximum(b, tiny))), num, den, n_boot=n_boot)


def _interval(ci, fmt: str = "#.3g") -> str:
    return f"{ci[0]:{fmt}} [{ci[1]:{fmt}}, {ci[2]:{fmt}}]"


def skip_checks(section: str, ratio: dict[str, np.ndarray], depth: dict[str, np.ndarray], outputs: dict[str, dict],
                profile: Profile, *, n_boot: int = 300, factor: float = SKIP_CONTRAST) -> list[ClaimCheck]:
    """The four claims of Sec. 4.1, judged on DINOv2 without registers, the same images in every size, each
    contrast of the giant with a smaller size paired and at least ``factor``:

    Fig. 5a: g's skip/patch norm ratio at least ``factor`` times each of S, B and L's (the median of the per-image
    ratios, its interval), and the ratio rising with size (steps back within ``factor``; Fig. 7: "attention to the
    skip connection consistently grows with model size"). No absolute band: the figure gives no values.
    Fig. 5b: S, B and L make more than :data:`JUMP_SHARE` of their [CLS]'s change along the depth in the last block,
    and that block changes it at least ``factor`` times as much as g's last block does; g's penultimate cosine is
    above :data:`VERY_SIMILAR`. "More smoothly": the largest change any single block makes, in each of S, B, L at
    least ``factor`` times g's.
    Fig. 6: S and B patch-only CKA close to 1 (Sec. 5 names the base model), at least ``factor`` times g's (paired
    CKA ratio), falling with size (Fig. 8: "with growing model size"); in g the skip-only output matches better than
    the patch-only one. L is held by the trend only: "for the larger models" may or may not include it.

    ``ratio[size]``: :func:`regcls.metrics.skip_patch_ratio`; ``depth[size]``: :func:`regcls.metrics.layer_cosine`;
    ``outputs[size]``: :func:`regcls.metrics.skip_outputs`.
    """
    need = SMALLER + ("g",)

    @functools.cache   # each contrast is shown in the row and judged by its rule: computed once
    def ratio_over(a, b):
        return paired_ratio(ratio[a], ratio[b], n_boot)

    @functools.cache
    def changes(s):
        return metrics.depth_changes(depth[s])

    @functools.cache
    def change_over(kind, a, b):
        return paired_ratio(changes(a)[kind], changes(b)[kind], n_boot)

    @functools.cache
    def cka(s, part):
        return metrics.cka(outputs[s]["standard"], outputs[s][part])

    @functools.cache
    def cka_over(a, b):
        return metrics.cka_ratio_interval(outputs[a]["standard"], outputs[a]["patch"], outputs[b]["standard"],
                                          outputs[b]["patch"], n_boot=n_boot)

    @functools.cache
    def skip_minus_patch(s):
        o = outputs[s]
        return metrics.cka_difference_interval(o["standard"], o["skip"], o["standard"], o["patch"], n_boot=n_boot)

    def med(x):
        return float(np.median(x))

    sizes = [s for s in need if s in ratio]
    return [
        check(section, "S, B and L use both the skip term and the patches; giant is dominated by the skip term",
              f"qualitative (Fig. 5a: S, B, L 'attend to both', g 'strongly dominated by the skip features'; no values): "
              f"g against each smaller size on the same images, at least {factor:g}x (ours: a doubling); rising with "
              f"size (Fig. 7: 'consistently grows with model size')",
              lambda: "median skip/patch norm ratio: " + ", ".join(f"{s} {med(ratio[s]):.3g}" for s in sizes)
              + "; paired g / smaller, median of the per-image ratios: "
              + ", ".join(f"g / {s} {_interval(ratio_over('g', s))}" for s in SMALLER),
              lambda: all_of(*(interval_above(f"paired g / {s} skip/patch ratio", ratio_over("g", s), factor, "#.3g")
                               for s in SMALLER),
                             rises_within("median skip/patch ratio", {s: med(ratio[s]) for s in need}, factor)),
              profile, needs=need),
        check(section, "S, B, L jump at the last layer; in giant the penultimate [CLS] is already close to the final one",
              f"qualitative (Fig. 5b: S, B, L 'a large jump at the very last layer', their similarity to all previous "
              f"layers 'low'; g's penultimate output 'already very similar to the final one'): the last block makes "
              f"over {JUMP_SHARE:.0%} of the change along the depth, {factor:g}x g's last-block change; g above "
              f"cosine {VERY_SIMILAR}",
              lambda: "last block's share of the [CLS]'s change along the depth (median): "
              + ", ".join(f"{s} {med(changes(s)['last share']):.2f}" for s in sizes)
              + f"; g penultimate cosine {float(depth['g'][:, -2].mean()):.3f}; paired last-block change, smaller / g: "
              + ", ".join(f"{s} / g {_interval(change_over('last', s, 'g'))}" for s in SMALLER),
              lambda: all_of(*(above(f"{s}: last block's share of the change", med(changes(s)["last share"]), JUMP_SHARE)
                               for s in SMALLER),
                             *(interval_above(f"paired {s} / g last-block change", change_over("last", s, "g"), factor,
                                              "#.3g") for s in SMALLER),
                             above("g penultimate cosine", float(depth["g"][:, -2].mean()), VERY_SIMILAR, ".3f")),
              profile, needs=need),
        check(section, "Giant converges to the final [CLS] more smoothly than S, B and L (no block makes a large change)",
              f"qualitative (Fig. 5b: the giant's [CLS] 'converges to the final output more smoothly'): the largest "
              f"change any single block makes to the [CLS]'s cosine to the final one, in each of S, B, L at least "
              f"{factor:g}x g's, on the same images",
              lambda: "largest single-block change (median over images): "
              + ", ".join(f"{s} {med(changes(s)['largest']):.3f}" for s in sizes)
              + "; paired smaller / g: " + ", ".join(f"{s} / g {_interval(change_over('largest', s, 'g'))}" for s in SMALLER),
              lambda: all_of(*(interval_above(f"paired {s} / g largest single-block change",
                                              change_over("largest", s, "g"), factor, "#.3g") for s in SMALLER)),
              profile, needs=need),
        check(section, "For large models the patch-based output does not represent the global output; for S and B it does",
              f"qualitative (Fig. 6; Sec. 5: no disconnect in the smaller models, 'including the widely used base "
              f"model'): S and B patch-only CKA close to 1 (> 0.9), {factor:g}x g's; falling with size (Fig. 8)",
              lambda: "CKA patch-only: " + ", ".join(f"{s} {cka(s, 'patch'):.3f}" for s in sizes)
              + f"; g skip-only {cka('g', 'skip'):.3f}; paired "
              + ", ".join(f"{s} / g {_interval(cka_over(s, 'g'))}" for s in ("S", "B"))
              + f"; paired g skip - patch {_interval(skip_minus_patch('g'), '.3f')}",
              lambda: all_of(*(above(f"{s} patch-only CKA", cka(s, "patch"), 0.9, ".3f") for s in ("S", "B")),
                             *(interval_above(f"paired {s} / g patch-only CKA", cka_over(s, "g"), factor, "#.3g")
                               for s in ("S", "B")),
                             monotone("patch-only CKA", {s: cka(s, "patch") for s in need}, increasing=False, tol=0.02,
                                      fmt=".3f"),
                             interval_above("paired g skip - patch CKA", skip_minus_patch("g"), 0.0, ".3f")),
              profile, needs=need),
    ]


def orthogonal_check(section: str, cos_large: np.ndarray, cos_small: np.ndarray, profile: Profile, *,
                     paper: float = -0.0092, n_boot: int = 1000) -> ClaimCheck:
    """Sec. 3.4's example image (giant with registers): the patch-based output orthogonal to the full output.
    ``cos_large``/``cos_small``: the per-image cosine of the two in g and in S, the same images. Judged on every
    image and against S: some image of g is as orthogonal as the paper's (|cos| < :data:`ORTHOGONAL`), and such
    images are more common in g than in S on the same images (the paired difference of the shares, its interval
    above 0). The smallest |cos| alone says little: among thousands of images some are near any value."""
    def share_diff():
        orth_l = (np.abs(cos_large) < ORTHOGONAL).astype(float)
        orth_s = (np.abs(cos_small) < ORTHOGONAL).astype(float)
        return metrics.bootstrap_ci(np.mean, orth_l - orth_s, n_boot=n_boot)

    def ours():
        a_l, a_s = np.abs(cos_large), np.abs(cos_small)
        return (f"g: closest to orthogonal {cos_large[np.argmin(a_l)]:.4f}, |cos| < {ORTHOGONAL} for "
                f"{(a_l < ORTHOGONAL).mean():.1%} of images (median |cos| {np.median(a_l):.3f}); S on the same images: "
                f"{(a_s < ORTHOGONAL).mean():.1%} (median |cos| {np.median(a_s):.3f}); paired difference of the "
                f"shares g - S {_interval(share_diff(), '.3f')}")

    return check(section, "For the example image the patch-based output is orthogonal to the full output "
                 "(in g, not in S on the same images)",
                 f"{paper} (one image, g with registers)", ours,
                 lambda: all_of(below("g: smallest |cos| over the images", float(np.abs(cos_large).min()), ORTHOGONAL,
                                      ".4f"),
                                interval_above(f"paired share of images with |cos| < {ORTHOGONAL}, g - S", share_diff(),
                                               0.0, ".3f")),
                 profile, needs=("S", "g"))


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
