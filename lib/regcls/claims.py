"""The paper's claims beside this run's numbers: the rule kinds (each writes its own text with this run's numbers),
the claim row, its verdict, and the records the chapters keep and the claims page collects. The rules of each
section of the paper, built from these, are in :mod:`regcls.rules`."""
from __future__ import annotations

import functools
import html
import json
from dataclasses import asdict, dataclass, field

from .env import image_cap, records_dir
from .files import LIB_ROOT, atomic_write_text, csv_text, data_link, library_digest
from .profiles import Profile


@dataclass(frozen=True)
class Rule:
    """An agreement rule that writes its own text: what is compared, with this run's numbers, and the outcome.

    Build rules with :func:`above`, :func:`below`, :func:`within_factor`, :func:`interval_above`,
    :func:`interval_below`, :func:`monotone`, :func:`rises_within` and combine them with :func:`all_of`; a chapter
    never judges with a bare ``bool`` (the rules of each section are in :mod:`regcls.rules`).
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


def interval_below(name: str, ci: tuple[float, float, float], bound: float, fmt: str = ".2f") -> Rule:
    """A bootstrap interval ``(value, low, high)`` lies below ``bound`` (a quantity shown to be small)."""
    v, lo, hi = ci
    return Rule(f"{name} {v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}] below {bound:{fmt}}", bool(hi < bound))


def rises_within(name: str, values: dict[str, float], factor: float, fmt: str = ".3g") -> Rule:
    """Positive values (a norm ratio) rise in the order given (the paper's size order), where a step back by less
    than ``factor`` counts as level: two sizes within that factor of each other are not told apart."""
    v = list(values.values())
    ok = len(v) > 1 and all(b > a / factor for a, b in zip(v, v[1:]))
    return Rule(f"{name} rises with size: " + " < ".join(f"{k} {x:{fmt}}" for k, x in values.items())
                + f" (steps back by less than {factor:g}x allowed)", bool(ok))


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
    models: str = ""   # the profile's models the row was measured on (label: timm name, weights)
    page: str = ""     # where the chapter shows the row: "sec3_3_register_knockout.html#claims-sec3_3"

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


def not_computed(section: str, claim: str, paper: str, why: str, profile: Profile,
                 models: str | None = None) -> ClaimCheck:
    """A row whose numbers could not be computed on this machine (``why``: a missing checkpoint, say)."""
    return ClaimCheck(section, claim, paper, f"not computed: {why}", None, profile.name, status="not computed",
                      models=profile_models(profile) if models is None else models)


def check(section: str, claim: str, paper: str, ours, agrees, profile: Profile,
          needs: tuple[str, ...] = (), missing: list[str] | None = None, models: str | None = None) -> ClaimCheck:
    """A claim row; when ``profile`` lacks a model size in ``needs`` the row is "not testable" instead.

    ``ours`` is this run's numbers (text) and ``agrees`` a :class:`Rule`; either may be a function without
    arguments, called only when the profile has every size in ``needs`` (so that it may index them).
    ``needs`` names sizes of the DINOv2 models with registers (``("L", "g")``) the claim is about;
    ``missing`` gives the missing sizes directly (appendix families, :func:`regcls.profiles.appendix_missing`).
    ``models``: the models the row was measured on, as recorded (default: the profile's DINOv2 series,
    :func:`profile_models`).
    """
    what = f"its DINOv2 sizes: {', '.join(profile.sizes(True))}"
    models = profile_models(profile) if models is None else models
    if missing is None:
        missing = [s for s in needs if s not in profile.sizes(True)]
    else:
        what = "the series' other sizes"
    if missing:
        measured = "" if callable(ours) else f" Measured: {ours}"
        return ClaimCheck(section, claim, paper, f"needs {', '.join(missing)}, which the {profile.name} profile "
                          f"does not have ({what}).{measured}", None, profile.name, models=models)
    ours = ours() if callable(ours) else ours
    agrees = agrees() if callable(agrees) else agrees
    rule = agrees.text if isinstance(agrees, Rule) else ""
    return ClaimCheck(section, claim, paper, ours, bool(agrees.ok if isinstance(agrees, Rule) else agrees),
                      profile.name, rule=rule, models=models)


def profile_models(profile: Profile, family: str | None = None) -> str:
    """The models of a profile's two DINOv2 series (or of one appendix ``family``), as a claim row records them:
    ``label: timm name (weights)``."""
    models = profile.models if family is None else dict(profile.appendix).get(family, ())
    return "; ".join(f"{m.label}: {m.name} ({m.weights})" for m in models)


def verdict_counts(checks: list[ClaimCheck]) -> dict[str, int]:
    """How many rows read each verdict (:data:`VERDICTS`, in that order)."""
    return {v: sum(verdict(c) == v for c in checks) for v in VERDICTS}


# The tint of each verdict's cell in a table (the verdict lines' colours, book/_static/regcls.css, made light)
VERDICT_COLOURS = {"yes": "#e3f1e6", "no": "#fbe3e1", "not testable": "#eeeeee", "not computed": "#fdf0d9"}


def table(checks: list[ClaimCheck], notes: list[str] | None = None, notes_title: str = "note", links: bool = False):
    """A page table: section, verdict (its cell coloured by it, beside the claim, where a wide table does not hide
    it), claim, paper, this run, rule, profile; ``notes`` (one per row) in a
    column of their own; ``links``: each section links to where its chapter shows the row (the claims page)."""
    import pandas as pd

    def section(c):
        return f'<a href="{html.escape(c.page)}">{html.escape(c.section)}</a>' if links and c.page else html.escape(c.section)

    df = pd.DataFrame([{"section": section(c), "agrees": verdict(c) + (" (stale: other code, rerun the chapter)" if c.stale else ""),
                        "claim": c.claim, "paper": c.paper, "this run": c.ours, "rule (agrees if)": c.rule or "-",
                        "profile": c.profile + (f" (capped at {c.images_cap} images)" if c.images_cap else ""),
                        **({notes_title: notes[i]} if notes is not None else {})} for i, c in enumerate(checks)])
    colour = [f"background-color: {VERDICT_COLOURS[verdict(c)]}" for c in checks]
    return df.style.hide(axis="index").apply(lambda _: colour, subset=["agrees"]) if checks else df.style.hide(axis="index")


def provenance(checks: list[ClaimCheck]) -> str:
    """Which code computed these rows, and on which models, in one line (the footnote under a claims table)."""
    stamps = sorted({c.stamp for c in checks})
    models = sorted({c.models for c in checks if c.models})
    return ("Computed by: " + ("; ".join(stamps) if stamps else "-") + "."
            + (f" Models: {' | '.join(models)}." if models else ""))


def downloads(checks: list[ClaimCheck], profile: str) -> str:
    """Links that download these rows as CSV and as JSON (every field, the verdict among them), embedded in the
    page itself (data URLs): the same in the book, in Jupyter and on Colab, with no file beside the page."""
    rows = [{**asdict(c), "verdict": verdict(c)} for c in checks]
    text = csv_text(rows, list(rows[0]) if rows else ["verdict"])
    return (f'<p class="regcls-downloads">Download the {len(rows)} rows: '
            f'{data_link(text, "text/csv", f"claims-{profile}.csv")} &middot; '
            f'{data_link(json.dumps(rows, indent=1), "application/json", f"claims-{profile}.json")}</p>')


def record(chapter: str, checks: list[ClaimCheck]) -> None:
    """Save a chapter's checks (per profile) for the claims page."""
    profile = checks[0].profile if checks else "none"
    folder = records_dir() / "claims" / profile
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{chapter}.json", json.dumps([asdict(c) for c in checks], indent=1))


def collect(profile: str) -> list[ClaimCheck]:
    """Every recorded check of one profile, in section order."""
    out = []
    for f in sorted((records_dir() / "claims" / profile).glob("*.json")):
        out += [ClaimCheck(**d) for d in json.loads(f.read_text())]
    return sorted(out, key=lambda c: c.section)
