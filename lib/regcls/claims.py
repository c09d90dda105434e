"""The paper's claims beside this run's numbers: each chapter checks its claims and records them, and the
claims page collects the records."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .cache import cache_dir
from .profiles import Profile, image_cap


@dataclass
class ClaimCheck:
    """One claim of the paper, what the paper shows, what this run measured, and whether they agree.

    ``agrees`` is None when the profile lacks what the claim needs (e.g. the giant model on ``laptop``):
    such a row neither agrees nor disagrees. ``images_cap`` is the ``REGCLS_LIMIT`` the run was made under.
    """

    section: str
    claim: str
    paper: str     # the paper's number, or its qualitative finding (with figure)
    ours: str      # this run's number(s), with intervals
    agrees: bool | None
    profile: str
    images_cap: int | None = field(default_factory=image_cap)

    @property
    def verdict(self) -> str:
        return {True: "agrees", False: "does not agree", None: "not testable on this profile"}[self.agrees]


def check(section: str, claim: str, paper: str, ours: str, agrees: bool, profile: Profile,
          needs: tuple[str, ...] = (), missing: list[str] | None = None) -> ClaimCheck:
    """A claim row; when ``profile`` lacks a model size in ``needs`` the row is "not testable" instead.

    ``needs`` names sizes of the DINOv2 models with registers (``("L", "g")``) the claim is about;
    ``missing`` gives the missing sizes directly (appendix families, :func:`regcls.profiles.appendix_missing`).
    """
    what = f"its DINOv2 sizes: {', '.join(profile.sizes(True))}"
    if missing is None:
        missing = [s for s in needs if s not in profile.sizes(True)]
    else:
        what = "the series' other sizes"
    if missing:
        return ClaimCheck(section, claim, paper, f"needs {', '.join(missing)}, which the {profile.name} profile "
                          f"does not have ({what}). Measured: {ours}", None, profile.name)
    return ClaimCheck(section, claim, paper, ours, bool(agrees), profile.name)


def table(checks: list[ClaimCheck]):
    """A page table: claim, paper, this run, profile, verdict."""
    import pandas as pd

    short = {True: "yes", False: "no", None: "not testable"}
    df = pd.DataFrame([{"section": c.section, "claim": c.claim, "paper": c.paper, "this run": c.ours,
                        "profile": c.profile + (f" (capped at {c.images_cap} images)" if c.images_cap else ""),
                        "agrees": short[c.agrees]} for c in checks])
    return df.style.hide(axis="index")


def record(chapter: str, checks: list[ClaimCheck]) -> None:
    """Save a chapter's checks (per profile) for the claims page."""
    profile = checks[0].profile if checks else "none"
    folder = cache_dir() / "claims" / profile
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{chapter}.json").write_text(json.dumps([asdict(c) for c in checks], indent=1))


def collect(profile: str) -> list[ClaimCheck]:
    """Every recorded check of one profile, in section order."""
    out = []
    for f in sorted((cache_dir() / "claims" / profile).glob("*.json")):
        out += [ClaimCheck(**d) for d in json.loads(f.read_text())]
    return sorted(out, key=lambda c: c.section)
