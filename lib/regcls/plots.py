"""The book's figure style and the figure helpers several chapters share (figures only; the page around them
is :mod:`regcls.page`)."""
from __future__ import annotations


import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from .files import csv_text, data_link
from .profiles import ORDER

# Light to dark blue by size; the lightest still at 3:1 contrast on white (a graphical object's minimum, WCAG 2.1)
PALETTE = {"S": "#4a90c8", "S+": "#2f7ab9", "B": "#1763a6", "L": "#0b4f8a", "H+": "#084378", "g": "#08306b"}
PART_COLORS = {"cls": "#7f7f7f", "reg": "#d62728", "patch": "#1f77b4", "skip": "#2ca02c"}
PART_NAMES = {"cls": "[CLS] (self)", "reg": "registers", "patch": "patches", "skip": "skip (residual)"}


def setup() -> None:
    """One style for every figure of the book."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.0)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (6.4, 3.6),
                         "axes.titlesize": 11, "axes.labelsize": 10})
    try:   # figures at twice the pixels they are shown at: sharp on high-density screens, in the book and in Jupyter
        from matplotlib_inline.backend_inline import set_matplotlib_formats
        set_matplotlib_formats("retina")
    except ImportError:   # pragma: no cover (matplotlib-inline comes with IPython)
        pass


def size_label(size: str, registers: bool | None = None) -> str:
    """Axis label of a model size, ``"g"`` or ``"g+reg"``."""
    return size + ("+reg" if registers else "")


def order(sizes) -> list[str]:
    """Sizes in the paper's order (DINOv3's S+ and H+ in theirs, by parameters); labels of your own ("CLIP-L")
    after them, in the order given."""
    return [s for s in ORDER if s in sizes] + [s for s in sizes if s not in ORDER]


# Labels of your own: a qualitative palette (Tableau 10, every colour at 3:1 or more on white but the light ones)
OTHER_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def colour(label: str, labels=()) -> str:
    """The colour of a model: the paper's sizes by :data:`PALETTE`, other labels in turn from
    :data:`OTHER_COLOURS` by their place among ``labels``."""
    if label in PALETTE:
        return PALETTE[label]
    others = [x for x in labels if x not in PALETTE]
    return OTHER_COLOURS[others.index(label) % len(OTHER_COLOURS) if label in others else 0]


def strip_by_size(ax, values: dict[str, np.ndarray], ylabel: str, registers: bool | None = None) -> None:
    """Per-image distribution of one statistic per model size: violin + points, sizes in paper order."""
    sizes = order(values)
    data = [np.asarray(values[s]) for s in sizes]
    parts = ax.violinplot(data, showextrema=False, widths=0.8)
    for body, s in zip(parts["bodies"], sizes):
        body.set_facecolor(colour(s, sizes))
        body.set_alpha(0.35)
    rng = np.random.default_rng(0)
    for i, (s, d) in enumerate(zip(sizes, data), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=6, color=colour(s, sizes), alpha=0.8, lw=0)
        ax.hlines(np.mean(d), i - 0.3, i + 0.3, color="k", lw=1.5)
    ax.set_xticks(range(1, len(sizes) + 1), [size_label(s, registers) if s in PALETTE else s for s in sizes])
    ax.set_xlabel("model size" if all(s in PALETTE for s in sizes) else "model")
    ax.set_ylabel(ylabel)


def interval_table(rows: list[dict]):
    """A small pandas table of statistics with their bootstrap intervals, formatted for the page: an estimate and
    the interval column after it (named ``... 95% CI``) share one cell, ``0.966 [0.950, 0.980]``."""
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = list(df.columns)
    for i in range(len(cols) - 1, 0, -1):
        ci, est = cols[i], cols[i - 1]
        if str(ci).strip().endswith("95% CI") and pd.api.types.is_numeric_dtype(df[est]):
            df[est] = [f"{v:.3f} {c}" for v, c in zip(df[est], df[ci])]
            df = df.drop(columns=ci).rename(columns={est: f"{est} [95% CI]"})
            cols = list(df.columns)
    return df.style.format(precision=3).hide(axis="index")


def folded(table, summary: str):
    """A table folded away under a one-line ``summary`` the reader opens (a sensitivity grid, say): an HTML
    ``<details>``, the same in the book, in Jupyter and on Colab."""
    import html

    from IPython.display import HTML

    inner = table.to_html() if hasattr(table, "to_html") else str(table)
    return HTML(f'<details class="regcls-folded"><summary>{html.escape(summary)}</summary>{inner}</details>')


def interval_bars(ax, stats: dict[str, dict[str, tuple[float, float, float]]], parts: tuple[str, ...],
                  xlabels: dict[str, str] | None = None, colors: dict[str, str] | None = None,
                  label: str = "{} only") -> None:
    """Grouped bars of ``(value, low, high)`` per model size and part, with 95% interval whiskers.

    ``stats[size][part]`` as :func:`regcls.metrics.bootstrap_ci` returns it; colours by part (or ``colors``), and
    each bar group's legend entry is ``label`` filled with the part's name.
    """
    sizes = list(stats)
    width = 0.8 / len(parts)
    for j, part in enumerate(parts):
        v = np.array([stats[s][part] for s in sizes], dtype=float)
        x = np.arange(len(sizes)) + (j - (len(parts) - 1) / 2) * width
        ax.bar(x, v[:, 0], width=width, color=(colors or PART_COLORS).get(part, "#444"),
               label=label.format(PART_NAMES.get(part, part)))
        ok = np.isfinite(v[:, 1:]).all(axis=1)  # the interval as drawn: a percentile interval need not hold
        ax.vlines(x[ok], v[ok, 1], v[ok, 2], color="k", lw=1,   # the estimate (few images), so no error bars
                  label="_" + label.format(PART_NAMES.get(part, part)) + ", 95% interval")   # (not in the legend)
    ax.set_xticks(range(len(sizes)), [(xlabels or {}).get(s, s) for s in sizes])
    ax.set_xlabel("model size")


def figure_numbers(fig) -> list[dict]:
    """What ``fig`` draws, as rows (panel: its title or number; kind; series: the legend label; x; y): each line's
    points, each bar (its height, at its category), each scatter point, each segment (whiskers, means: y = low,
    y_high = high) and each map's cells (x: column, y: row, value). Photos are left out: they are the images, not
    numbers. Positions within half a step of a named tick (grouped bars, jittered points) take the tick's name."""
    from matplotlib.category import StrCategoryFormatter
    from matplotlib.collections import LineCollection, PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.image import AxesImage

    rows = []
    for k, ax in enumerate(a for a in fig.axes if a.get_label() != "<colorbar>"):
        panel = ax.get_title() or f"panel {k + 1}"
        named = isinstance(ax.xaxis.get_major_formatter(), (matplotlib.ticker.FixedFormatter, matplotlib.ticker.FuncFormatter,
                                                            StrCategoryFormatter))   # ticks named: categories
        ticks = [(float(t), l.get_text()) for t, l in zip(ax.get_xticks(), ax.get_xticklabels()) if named and l.get_text()]

        def at(x):   # a category's name where x lies within half a step of its tick
            near = min(ticks, key=lambda t: abs(t[0] - float(x)), default=None)
            return near[1] if near and abs(near[0] - float(x)) < 0.5 else float(x)

        def series(artist):
            label = artist.get_label()
            return "" if label.startswith("_child") else label.lstrip("_")

        for line in ax.get_lines():
            rows += [{"panel": panel, "kind": "line", "series": series(line), "x": at(x), "y": float(y)}
                     for x, y in line.get_xydata()]
        for c in ax.containers:
            if isinstance(c, BarContainer):
                rows += [{"panel": panel, "kind": "bar", "series": series(c), "x": at(r.get_x() + r.get_width() / 2),
                          "y": float(r.get_height())} for r in c.patches]
        for coll in ax.collections:
            if isinstance(coll, PathCollection):
                rows += [{"panel": panel, "kind": "point", "series": series(coll), "x": at(x), "y": float(y)}
                         for x, y in coll.get_offsets()]
            elif isinstance(coll, LineCollection):
                rows += [{"panel": panel, "kind": "segment", "series": series(coll),
                          "x": at((seg[0][0] + seg[-1][0]) / 2), "y": float(min(seg[0][1], seg[-1][1])),
                          "y_high": float(max(seg[0][1], seg[-1][1]))} for seg in coll.get_segments() if len(seg)]
        for im in ax.get_images():
            a = np.asarray(im.get_array())
            if isinstance(im, AxesImage) and a.ndim == 2:
                rows += [{"panel": panel, "kind": "map", "series": ax.get_ylabel(), "x": c, "y": r, "value": float(a[r, c])}
                         for r in range(a.shape[0]) for c in range(a.shape[1])]
    return rows


def numbers(fig, name: str):
    """A link under a figure that downloads its numbers (:func:`figure_numbers`) as ``NAME.csv``."""
    from IPython.display import HTML

    rows = figure_numbers(fig)
    text = csv_text(rows, list(dict.fromkeys(k for r in rows for k in r)) or ["panel"])
    return HTML(f'<p class="regcls-numbers">The numbers of this figure ({len(rows)} rows): '
                f'{data_link(text, "text/csv", f"{name}.csv")}</p>')


def distinct(values, digits: int = 2, most: int = 6) -> list[str]:
    """``values`` as text with ``digits`` decimals, or more (up to ``most``) where values that differ would read the
    same: two images whose shares tie at 0.50 read 0.501 and 0.505; values too small for that read in significant
    digits (5.1e-18)."""
    values = [float(v) for v in values]
    distinct_values = len(set(values))
    for d in range(digits, most + 1):
        text = [f"{v:.{d}f}" for v in values]
        if len(set(text)) == distinct_values and all(float(t) != 0 or v == 0 for t, v in zip(text, values)):
            return text
    for d in range(digits, most + 1):
        text = [f"{v:.{d}g}" for v in values]
        if len(set(text)) == distinct_values:
            return text
    return text


def legend_beside(ax, **kwargs):
    """The axes' legend outside them, to the right, where it covers no bar or point (``plt.tight_layout`` makes room
    for it). Returns the legend."""
    return ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0, "frameon": False,
                        "fontsize": 9, **kwargs})


def map_grid(images: list[np.ndarray], rows: dict[str, np.ndarray], titles: list[str] | None = None,
             cmap: str = "inferno", size: float = 2.4, cbar_label: str = "share of [CLS] attention"):
    """The images in the first row and, below them, one row of maps (n, rows, cols) per entry of ``rows``, labelled
    by its key; ``titles`` (one per image) go above the last row. Each map has its own colour scale (the maps of
    one image can differ by orders of magnitude) and its colourbar, ``cbar_label`` beside the last of a row.
    Returns the figure."""
    fig, axes = plt.subplots(1 + len(rows), len(images), figsize=(size * len(images) * 1.2, size * (1 + len(rows))),
                             squeeze=False)
    for j, image in enumerate(images):
        axes[0, j].imshow(image)
        for r, maps in enumerate(rows.values(), 1):
            im = axes[r, j].imshow(maps[j], cmap=cmap)
            bar = fig.colorbar(im, ax=axes[r, j], fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=9)
            bar.locator = matplotlib.ticker.MaxNLocator(3)
            bar.formatter = matplotlib.ticker.ScalarFormatter(useMathText=True)
            bar.formatter.set_powerlimits((-2, 3))   # small shares as 8 with x10^-4 on top, not 0.0008
            bar.update_ticks()
            bar.ax.yaxis.get_offset_text().set_fontsize(9)
            if j == len(images) - 1 and cbar_label:
                bar.set_label(cbar_label, fontsize=9)
        if titles:
            axes[-1, j].set_title(titles[j], fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    for r, label in enumerate(rows, 1):
        axes[r, 0].set_ylabel(label)
    return fig
