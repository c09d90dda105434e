"""The book's figure style, the banners every chapter shows, and the figure helpers chapters share."""
from __future__ import annotations

import html

import matplotlib.pyplot as plt
import numpy as np

from .env import hardware, image_cap
from .errors import RegclsError
from .profiles import SIZES, Profile

PALETTE = {"S": "#9ecae1", "B": "#4292c6", "L": "#08519c", "g": "#08306b"}
PART_COLORS = {"cls": "#7f7f7f", "reg": "#d62728", "patch": "#1f77b4", "skip": "#2ca02c"}
PART_NAMES = {"cls": "[CLS] (self)", "reg": "registers", "patch": "patches", "skip": "skip (residual)"}


def setup() -> None:
    """One style for every figure of the book."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.0)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (6.4, 3.6),
                         "axes.titlesize": 11, "axes.labelsize": 10})


def size_label(size: str, registers: bool | None = None) -> str:
    """Axis label of a model size, ``"g"`` or ``"g+reg"``."""
    return size + ("+reg" if registers else "")


def order(sizes) -> list[str]:
    """Sizes in the paper's order."""
    return [s for s in SIZES if s in sizes]


def _box(kind: str, title: str, body: str) -> str:
    return (f'<div class="admonition {kind} regcls-{kind}"><p class="admonition-title">{html.escape(title)}</p>'
            f"<p>{body}</p></div>")


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
                "in the pattern the paper reports (S and B integrate patches; with registers L and g read the "
                "registers, without registers g reads its own skip connection) on images that ship with Python "
                "packages. The pattern is planted to check the analysis and is <b>no evidence for or against "
                "the paper</b>; the paper profile gives the evidence. To get real figures, run the book with "
                "<code>make book PROFILE=paper</code> on a GPU, or this notebook on Colab with "
                "<code>REGCLS_PROFILE=laptop</code> or <code>paper</code>.")
        return HTML(f'<div class="regcls-smoke-banner">{_box("warning", "Smoke profile: planted controls, not real weights", body)}</div>')
    cap = image_cap()
    body = (f"Computed with the <b>{profile.name}</b> profile: {html.escape(profile.note)}; "
            f"{profile.img_size} px images."
            + (f" <b>Capped at {cap} images per dataset</b> (<code>REGCLS_LIMIT</code>): a first look, "
               "not the full run." if cap else ""))
    return HTML(_box("note", f"Profile: {profile.name}", body))


def strip_by_size(ax, values: dict[str, np.ndarray], ylabel: str, registers: bool | None = None) -> None:
    """Per-image distribution of one statistic per model size: violin + points, sizes in paper order."""
    sizes = order(values)
    data = [np.asarray(values[s]) for s in sizes]
    parts = ax.violinplot(data, showextrema=False, widths=0.8)
    for body, s in zip(parts["bodies"], sizes):
        body.set_facecolor(PALETTE[s])
        body.set_alpha(0.35)
    rng = np.random.default_rng(0)
    for i, (s, d) in enumerate(zip(sizes, data), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=6, color=PALETTE[s], alpha=0.8, lw=0)
        ax.hlines(np.mean(d), i - 0.3, i + 0.3, color="k", lw=1.5)
    ax.set_xticks(range(1, len(sizes) + 1), [size_label(s, registers) for s in sizes])
    ax.set_xlabel("model size")
    ax.set_ylabel(ylabel)


def interval_table(rows: list[dict]):
    """A small pandas table of statistics with their bootstrap intervals, formatted for the page."""
    import pandas as pd

    df = pd.DataFrame(rows)
    return df.style.format(precision=3).hide(axis="index")


def run_box(profile: Profile, notebook: str):
    """The "Run this chapter" box: Colab link, profile, hardware."""
    from IPython.display import HTML

    from . import REPOSITORY
    colab = f"https://colab.research.google.com/github/{REPOSITORY.split('github.com/')[1]}/blob/main/{notebook}"
    cap = image_cap()
    body = (f'<a href="{colab}">Open in Colab</a>, then <i>Run all</i> (the first cell installs regcls). '
            f"This page ran on the <b>{profile.name}</b> profile on {html.escape(hardware())}; the time it took "
            f"is given below. Another profile: set <code>REGCLS_PROFILE</code> before the first cell. Precision: "
            f"float32 on the CPU; on a GPU with native bfloat16, bfloat16 autocast for each model whose agreement "
            f"check with float32 passes (the last line of the page names the precision of every trace it read)."
            + (f" Images capped at <b>{cap}</b> per dataset (<code>REGCLS_LIMIT</code>)." if cap else ""))
    return HTML(_box("tip", "Run this chapter", body))


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


def start_chapter(notebook: str) -> tuple[Profile, float]:
    """A chapter's first cell: the profile, the book's style, the "Run this chapter" box and the banner.

    Returns ``(profile, start_time)``; pass ``start_time`` to :func:`finish` in the last cell.
    """
    import time

    from IPython.display import display

    from .profiles import active_profile

    start = time.time()
    one_line_errors()
    profile = active_profile(verbose=False)
    setup()
    display(run_box(profile, notebook))
    display(banner(profile))
    return profile, start


def interval_bars(ax, stats: dict[str, dict[str, tuple[float, float, float]]], parts: tuple[str, ...],
                  xlabels: dict[str, str] | None = None) -> None:
    """Grouped bars of ``(value, low, high)`` per model size and part, with 95% interval whiskers.

    ``stats[size][part]`` as :func:`regcls.metrics.bootstrap_ci` returns it; colours by part.
    """
    sizes = list(stats)
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        v = np.array([stats[s][part] for s in sizes], dtype=float)
        x = np.arange(len(sizes)) + (j - (len(parts) - 1) / 2) * width
        ax.bar(x, v[:, 0], width=width, color=PART_COLORS.get(part, "#444"), label=f"{PART_NAMES.get(part, part)} only")
        ok = np.isfinite(v[:, 1:]).all(axis=1)  # the interval as drawn: a percentile interval need not hold
        ax.vlines(x[ok], v[ok, 1], v[ok, 2], color="k", lw=1)  # the estimate (few images), so no error bars
    ax.set_xticks(range(len(sizes)), [(xlabels or {}).get(s, s) for s in sizes])
    ax.set_xlabel("model size")


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb's glue where the book is built; nothing elsewhere (Colab needs no Sphinx)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(name, value, display=display)


def finish(start: float) -> str:
    """A chapter's last cell: glue the run time (shown at the top of the page) and say it."""
    import time

    from .cache import PRECISIONS

    seconds = time.time() - start
    glue("run_seconds", seconds)
    line = f"This chapter took {seconds:.0f} s on {hardware()}."
    if len(set(PRECISIONS.values())) == 1:
        line += f" Every trace it read ({len(PRECISIONS)}) ran in {next(iter(PRECISIONS.values()))}."
    elif PRECISIONS:
        line += " Precision of the traces it read: " + "; ".join(f"{k}: {v}" for k, v in PRECISIONS.items()) + "."
    return line
