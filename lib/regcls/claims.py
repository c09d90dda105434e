"""The paper's claims beside this run's numbers: each chapter checks its claims and records them, and the
claims page collects the records."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .cache import cache_dir


@dataclass
class ClaimCheck:
    """One claim of the paper, what the paper shows, what this run measured, and whether they agree."""

    section: str
    claim: str
    paper: str     # the paper's number, or its qualitative finding (with figure)
    ours: str      # this run's number(s), with intervals
    agrees: bool
    profile: str

    @property
    def verdict(self) -> str:
        return "agrees" if self.agrees else "does not agree"


def table(checks: list[ClaimCheck]):
    """A page table: claim, paper, this run, profile, verdict."""
    import pandas as pd

    df = pd.DataFrame([{"section": c.section, "claim": c.claim, "paper": c.paper, "this run": c.ours,
                        "profile": c.profile, "agrees": "yes" if c.agrees else "no"} for c in checks])
    return df.style.hide(axis="index")


def record(chapter: str, checks: list[ClaimCheck]) -> None:
    """Save a chapter's checks (per profile) for the claims page."""
    folder = cache_dir() / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    profile = checks[0].profile if checks else "none"
    (folder / f"{chapter}-{profile}.json").write_text(json.dumps([asdict(c) for c in checks], indent=1))


def collect(profile: str) -> list[ClaimCheck]:
    """Every recorded check of one profile, in section order."""
    out = []
    for f in sorted((cache_dir() / "claims").glob(f"*-{profile}.json")):
        out += [ClaimCheck(**d) for d in json.loads(f.read_text())]
    return sorted(out, key=lambda c: c.section)
