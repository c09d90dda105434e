"""The page around a chapter's figures: the "Run this chapter" box, the banner that says where the numbers come
from, the finding (shown by the notebook, its numbers glued), the claims table, the run time and the record of
the run, all through one object::

    ch = Chapter("sec3_1_register_attention")   # profile, style, run box, banner, timer
    traces = ch.traces(registers=True)           # also dataset=, img_size=, crop_pct=
    ch.finding("The smallest gives {reg_small:.2f} ...", reg_small=...)   # shown by the notebook, glued for the book
    ch.claims([...])
    ch.finish()
"""
from __future__ import annotations

import html
import time
from dataclasses import replace

from . import REPOSITORY, plots
from .cache import HELD, PRECISIONS, READ, profile_traces, trace_for
from .claims import VERDICTS, ClaimCheck, provenance, record, table, verdict_counts
from .env import hardware, image_cap, records_dir
from .files import atomic_write_text
from .errors import RegclsError
from .profiles import ModelSpec, Profile, active_profile


class Chapter:
    """One chapter's page furniture. ``name`` is the notebook's file name without ``.ipynb``."""

    def __init__(self, name: str):
        from IPython.display import display

        self.name, self.start = name, time.time()
        one_line_errors()
        self.profile: Profile = active_profile(verbose=False)
        plots.setup()
        display(run_box(self.profile, f"chapters/{name}.ipynb"))
        display(banner(self.profile))

    def traces(self, registers: bool = True, dataset: str | None = None, img_size: int | None = None,
               crop_pct: float | None = None, specs=None, keep=None) -> dict[str, dict]:
        """The profile's traces of the DINOv2 models with (or without) registers, keyed by size; or of ``specs``
        (e.g. ``profile.dinov3``). ``keep(trace)``: what to keep of each instead, one trace in memory at a time
        (:func:`regcls.cache.profile_traces`)."""
        return profile_traces(self.profile, registers, dataset, img_size, crop_pct=crop_pct, specs=specs, keep=keep)

    def trace(self, spec: ModelSpec, dataset: str | None = None, img_size: int | None = None):
        """One model's trace (e.g. ``profile.testtime``) on the profile's images and settings, unless told."""
        return trace_for(self.profile, spec, dataset, img_size)

    def glue(self, **values) -> None:
        """Numbers (and words) the prose cites with ``{glue:text}`NAME```."""
        for key, value in values.items():
            glue(key, value)

    def finding(self, text: str, title: str = "Finding", **values):
        """The chapter's finding, shown by the notebook itself (Markdown output, so that Colab and Jupyter show
        the same text and numbers as the book) and each value glued for the book's prose. ``text`` is a Python
        format string over ``values`` (``"{reg_large:.2f}"``); ``title`` becomes its heading (empty: none).
        Returns nothing: as the last line of a cell, a returned object would be shown a second time."""
        from IPython.display import Markdown, display

        self.glue(**values)
        display(Markdown((f"## {title}\n\n" if title else "") + text.format(**values)))

    def claims(self, checks: list[ClaimCheck], part: str = "") -> None:
        """Record this chapter's claim rows for the claims page and show them: the verdict line (which the book
        also shows at the top of the page, ``book/_static/regcls.js``), the table, and which code computed them in one
        footnote. Returns nothing (the rows are shown)."""
        from IPython.display import HTML, display

        stem = self.name.split("_")
        key = "_".join(stem[:2] if stem[0].startswith("sec") else stem[:1]) + (f"_{part}" if part else "")
        checks = [replace(c, page=f"{self.name}.html#claims-{key}") for c in checks]
        record(key, checks)
        display(HTML(verdict_line(checks, self.profile.name, anchor=f"claims-{key}")))
        display(table(checks))
        display(HTML(f'<p class="regcls-provenance">{html.escape(provenance(checks))}</p>'))

    def finish(self) -> None:
        """The last cell: the run time (shown at the top of the page) and the precision of every trace read; and
        the chapter's record of its run (:func:`record_run`)."""
        print(finish(self.start))
        record_run(self.name, self.profile, time.time() - self.start)


def _box(kind: str, title: str, body: str, more: str = "") -> str:
    """An admonition; ``more``: the details, folded away under the body."""
    fold = f'<details class="regcls-more"><summary>Details</summary><p>{more}</p></details>' if more else ""
    return (f'<div class="admonition {kind} regcls-{kind}"><p class="admonition-title">{html.escape(title)}</p>'
            f"<p>{body}</p>{fold}</div>")


def verdict_line(checks: list[ClaimCheck], profile: str, anchor: str = "") -> str:
    """One line: how many of these claim rows agree with the paper, do not, are not testable, not computed, on
    ``profile``. Its counts ride along as data attributes: the book adds them up at the top of the page
    (``book/_static/regcls.js``)."""
    counts = verdict_counts(checks)
    words = {"yes": "agree", "no": "do not", "not testable": "not testable", "not computed": "not computed"}
    slug = {v: v.replace(" ", "-") for v in VERDICTS}
    parts = [f'<span class="regcls-v-{slug[v]}">{n} {words[v]}</span>' for v, n in counts.items() if n]
    data = " ".join(f'data-{slug[v]}="{counts[v]}"' for v in VERDICTS)
    return (f'<p class="regcls-verdict" id="{html.escape(anchor)}" data-profile="{html.escape(profile)}" {data}>'
            f"<b>The paper's claims in this section, on the {html.escape(profile)} profile:</b> "
            + (" &middot; ".join(parts) or "no rows") + "</p>")


def banner(profile: Profile):
    """The visible notice of where this page's numbers come from (an IPython HTML object)."""
    import os

    from IPython.display import HTML

    if os.environ.get("REGCLS_REHEARSAL"):
        body = (f"This page is a <b>rehearsal</b> of the <b>{html.escape(profile.name)}</b> profile: every model "
                "has full-size <b>random weights</b> in place of the hub's, and the images are generated, not COCO "
                "or ImageNet. It checks that the real run executes end to end; its numbers mean nothing. "
                "<b>Never publish this page.</b>")
        return HTML(f'<div class="regcls-rehearsal-banner">{_box("danger", "Rehearsal: random weights, never to be published", body)}</div>')
    if profile.name.startswith("smoke"):
        body = ("The figures on this page come from the <b>smoke profile</b>: tiny ViTs with planted weights "
                "in the pattern the paper reports (the small sizes integrate patches; with registers the large "
                "sizes read the registers, without registers the largest reads its own skip connection; the DINOv3 "
                "stand-ins alike; the model given a test-time register has two planted outlier units) on images "
                "that ship with Python packages. The pattern is planted to check the analysis and is <b>no evidence for or against "
                "the paper</b>; the paper profile gives the evidence. To get real figures, open this notebook on "
                "Colab with a GPU (the <code>colab</code> profile: every DINOv2 size, about 20 minutes), or run the "
                "book with <code>make book PROFILE=paper</code> on a large GPU.")
        short = ("Tiny ViTs with <b>planted weights</b> on images that ship with Python packages: a check of the "
                 "analysis, <b>no evidence for or against the paper</b>. Real figures: open it on Colab with a GPU.")
        return HTML(f'<div class="regcls-smoke-banner">{_box("warning", "Smoke profile: planted controls, not real weights", short, more=body)}</div>')
    cap = image_cap()
    body = (f"Computed with the <b>{profile.name}</b> profile: {html.escape(profile.note)}; "
            f"{profile.img_size} px images."
            + (f" <b>Capped at {cap} images per dataset</b> (<code>REGCLS_LIMIT</code>): a first look, "
               "not the full run." if cap else ""))
    return HTML(_box("note", f"Profile: {profile.name}", body))


def run_box(profile: Profile, notebook: str):
    """The "Run this chapter" box: Colab link, profile, hardware."""
    from IPython.display import HTML

    colab = f"https://colab.research.google.com/github/{REPOSITORY.split('github.com/')[1]}/blob/main/{notebook}"
    cap = image_cap()
    body = (f'<a href="{colab}">Open in Colab</a>, choose a GPU (Runtime, Change runtime type, T4), then '
            f"<i>Run all</i>: the first cell installs regcls, and on Colab's GPU the <code>colab</code> profile is "
            f"chosen (DINOv2 S/B/L/g on 1,000 COCO images; the reproducing page gives the downloads and the time). "
            f"This page ran on the <b>{profile.name}</b> profile on {html.escape(hardware())}; the time it took "
            f"is given below. Another profile: <code>%env REGCLS_PROFILE=paper</code> (or <code>laptop</code>, "
            f"<code>smoke</code>) before the first cell. Precision: float32 on the CPU; on a GPU the first of "
            f"bfloat16 autocast, float16 autocast and TF32 that the GPU has and whose check against float32 passes, "
            f"else float32 (the last line of the page names the precision of every trace it read)."
            + (f" Images capped at <b>{cap}</b> per dataset (<code>REGCLS_LIMIT</code>)." if cap else ""))
    short = (f'<a href="{colab}">Open in Colab</a> (GPU, then <i>Run all</i>) &middot; ran on the '
             f"<b>{profile.name}</b> profile, {html.escape(hardware())}")
    return HTML(_box("tip", "Run this chapter", short, more=body))


def one_line_errors() -> None:
    """In a notebook, a :class:`RegclsError` (a missing dataset, a full disk, a busy output) shows as the one line
    ``error: ...`` the command line prints, not as a traceback; the cell still fails."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover (IPython is installed with the book)
        return
    shell = get_ipython()
    if shell is None:
        return

    def show(shell, etype, value, tb, tb_offset=None):
        lines = [f"error: {value}"]
        shell._showtraceback(etype, value, lines)
        return lines

    shell.set_custom_exc((RegclsError,), show)


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb's glue where the book is built; nothing elsewhere (Colab needs no Sphinx)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, value, display=display)


def record_run(name: str, profile: Profile, seconds: float) -> dict:
    """What a chapter's run took, in ``chapters/PROFILE/NAME.json`` of :func:`regcls.env.records_dir`: seconds,
    the hardware, the peak resident memory of its process (Linux), and every trace it read (model, dataset,
    resolution, images, precision), from which the reproducing page projects a chapter's time on other hardware;
    and what it held at once (``held``: each time its arrays grew, ``[index into traces, bytes per image]`` of every
    trace alive then), from which the rehearsal projects its memory on the full run."""
    import json
    from pathlib import Path

    peak = None
    status = Path("/proc/self/status")
    if status.is_file():
        line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
        peak = int(line.split()[1]) / 2**20 if line else None
    index = {k: i for i, k in enumerate(READ)}
    held = sorted({tuple(sorted((index[k], round(b)) for k, b in now if k in index)) for now in HELD} - {()})
    out = {"chapter": name, "profile": profile.name, "seconds": seconds, "hardware": hardware(), "peak_rss_gb": peak,
           "images_cap": image_cap(), "traces": list(READ.values()), "held": [[list(t) for t in h] for h in held]}
    atomic_write_text(records_dir() / "chapters" / profile.name / f"{name}.json", json.dumps(out, indent=1))
    return out


def finish(start: float) -> str:
    """A chapter's last cell: glue the time its numbers took (shown at the top of the page) and say how it splits:
    this run, and the traces it read from the cache, as long as they took when they were computed."""
    here = time.time() - start
    earlier = [r for r in READ.values() if not r.get("computed_here")]
    known = [r["seconds"] for r in earlier if r.get("seconds") is not None]
    glue("run_seconds", here + sum(known))
    line = f"This chapter took {here:.0f} s on {hardware()}"
    if earlier:
        where = sorted({r["computed_on"] for r in earlier if r.get("computed_on")})
        many = len(earlier) > 1
        line += (f"; the {len(earlier)} trace{'s' if many else ''} it read from the cache took {sum(known):.0f} s "
                 f"when {'they were' if many else 'it was'} computed"
                 + (f" (on {', '.join(where)})" if where else "")
                 + (f"; {len(earlier) - len(known)} of them from before their time was recorded"
                    if len(known) < len(earlier) else ""))
    line += "."
    if len(set(PRECISIONS.values())) == 1:
        line += f" Every trace it read ({len(PRECISIONS)}) ran in {next(iter(PRECISIONS.values()))}."
    elif PRECISIONS:
        line += " Precision of the traces it read: " + "; ".join(f"{k}: {v}" for k, v in PRECISIONS.items()) + "."
    return line

