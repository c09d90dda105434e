"""Build the smoke book warning-free and open every page in headless Chromium: no console errors from the
page itself, figures with a real size, the smoke banner, and a Colab button for that chapter's notebook."""
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("*.ipynb"))

pytestmark = [pytest.mark.browser, pytest.mark.slow]
FIGURE_NAMES = {p.stem: [c["metadata"]["mystnb"]["figure"]["name"] for c in json.loads(p.read_text())["cells"]
                         if "figure" in c["metadata"].get("mystnb", {})] for p in (ROOT / "chapters").glob("*.ipynb")}
# Chapters whose prose has math ($...$): MathJax must typeset it
MATH = {p.stem for p in (ROOT / "chapters").glob("*.ipynb")
        if any("$" in "".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown")}
FIGURES = {"sec3_1_register_attention": 3, "sec3_2_register_norms": 1, "sec3_3_register_knockout": 2,
           "sec3_4_attention_maps": 2, "sec4_1_skip_connection": 4, "controls": 1, "appendix_other_recipes": 1, "beyond_dinov3": 3,
           "beyond_test_time_registers": 2, "beyond_replacement_controls": 2,
           "beyond_explaining_maps": 2}


# Console errors of the Jupyter Book 1.0 theme itself, the same on every page of every such book: the
# sphinx-thebe configuration script is emitted twice (upstream), and the theme logs an empty stored colour
# mode of a fresh browser profile. Anything else fails the test.
THEME_NOISE = ("Identifier 'THEBE_JS_URL' has already been declared", "Got invalid theme mode")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The smoke book built outside the working tree (its ``_build`` is the reader's), then built again as the
    README's second command would after ``make test``: another trace cache, nothing recorded in it. The chapters'
    outputs come from the execution cache, and the claims page, which runs again, must still find their claims (they
    travel in the build folder: ``regcls.env.records_dir``)."""
    out = tmp_path_factory.mktemp("book")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernels must use the inline backend
    env.update(REGCLS_PROFILE="smoke", HF_HUB_OFFLINE="1")
    for cache in (env.get("REGCLS_CACHE"), str(out / "another-cache")):
        r = subprocess.run(["make", "book", "PROFILE=smoke", f"BOOK_OUT={out}"], cwd=ROOT,
                           env={**env, **({"REGCLS_CACHE": cache} if cache else {})}, capture_output=True, text=True,
                           timeout=1800)
        assert r.returncode == 0, "book build failed or warned:\n" + (r.stdout + r.stderr)[-4000:]
    html = out / "_build" / "html"
    assert len(list((out / "_build" / "records" / "claims" / "smoke").glob("*.json"))) >= 8   # with the pages
    assert not (out / "another-cache" / "claims").exists()
    handler = partial(QuietHandler, directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI installs Debian's chromium: see .ci/run)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def test_every_size_colour_is_visible_on_white():
    """3:1 contrast against the white page at least (WCAG 2.1 for graphical objects)."""
    from regcls.plots import PALETTE

    def luminance(hex_colour):
        c = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    assert {size: 1.05 / (luminance(c) + 0.05) >= 3 for size, c in PALETTE.items()} == {size: True for size in PALETTE}


def test_toc_lists_every_chapter():
    toc = (ROOT / "_toc.yml").read_text()
    for stem in CHAPTERS:
        assert f"chapters/{stem}" in toc


def test_repository_url_is_configured_once_and_agrees():
    import regcls
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert regcls.REPOSITORY == url
    for nb in (ROOT / "chapters").glob("*.ipynb"):
        assert f'"regcls @ git+{url}"' in nb.read_text().replace('\\"', '"'), nb.name


# The paper's figures in its arXiv HTML (LaTeXML's ids: figure N of section S is SS.FN, of appendix A A1.FN)
PAPER_HTML = "https://arxiv.org/html/2505.05892#"
PAPER_ANCHOR = {"2": "S3.F2", "3": "S3.F3", "4": "S3.F4", "5": "S4.F5", "6": "S4.F6", "9": "A1.F9"}

# Chapters whose claims table (and so whose verdict line) the page shows
CLAIMS = {p.stem for p in (ROOT / "chapters").glob("*.ipynb") if "ch.claims(" in p.read_text()}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page(site, browser, chapter):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(e))
    page.goto(f"{site}/chapters/{chapter}.html", wait_until="load")
    if chapter in MATH:   # MathJax ships with the site: the math is typeset offline, no raw TeX is left
        page.wait_for_selector("mjx-container", timeout=30_000)
        assert page.locator("mjx-container").count() >= 1
        assert "\\(" not in page.inner_text("article")
    # Resources from other origins cannot load offline; errors of the page itself count.
    own = [str(getattr(e, "text", e)) for e in errors
           if not (getattr(e, "location", None) and not e.location.get("url", "").startswith(site))]
    own = [e for e in own if not e.startswith(THEME_NOISE)]
    assert own == [], own
    sizes = page.eval_on_selector_all(".cell_output img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
    density = page.eval_on_selector_all(".cell_output img", "els => els.map(e => e.naturalWidth / e.getBoundingClientRect().width)")
    assert all(d >= 1.9 for d in density), density   # figures have twice the pixels they are shown at
    if chapter != "summary_claims":  # every computed figure has loaded with a real size
        assert len(sizes) >= FIGURES.get(chapter, 1) and all(w > 200 and h > 150 for w, h in sizes), sizes
    for name in FIGURE_NAMES[chapter]:   # each named figure has its caption; the paper's numbers, not the book's
        assert page.locator(f"figure#{name} figcaption").count() == 1, name
        caption = page.inner_text(f"figure#{name} figcaption")
        assert not re.match(r"\s*Fig\. \d", caption), caption
        links = page.eval_on_selector_all(f"figure#{name} figcaption a", "els => els.map(e => [e.innerText, e.href])")
        for text, href in links:   # "paper Fig. 2a" leads to that figure of the paper
            if text.startswith("paper Fig."):
                assert href == PAPER_HTML + PAPER_ANCHOR[text.split()[-1].rstrip("ab")], (text, href)
    names = page.eval_on_selector_all("p.regcls-numbers a[download]", "els => els.map(e => e.download)")
    assert names == [f"{n}.csv" for n in FIGURE_NAMES[chapter]], names   # each figure's numbers beside it
    assert page.locator(".regcls-smoke-banner").count() == 1
    # the first screen: the verdict of the page's claims and its first figure, above any code
    first_code = page.eval_on_selector("div.cell div.highlight", "e => e.getBoundingClientRect().top") \
        if page.locator("div.cell div.highlight").count() else 1e9
    if chapter in CLAIMS:
        box = page.locator(".regcls-headline .regcls-headline-verdict").bounding_box()
        assert box and box["y"] + box["height"] <= 900 and box["y"] < first_code, box
        lines = page.eval_on_selector_all(".regcls-verdict", "els => els.map(e => e.dataset)")
        said = page.inner_text(".regcls-headline-verdict")
        for key, word in (("yes", "agree"), ("no", "do not"), ("notTestable", "not testable")):
            n = sum(int(d[key]) for d in lines)
            assert (f"{n} {word}" in said) == (n > 0), (said, key, n)
    if chapter != "summary_claims":
        page.wait_for_function("() => { const i = document.querySelector('.regcls-headline img'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
        img = page.locator(".regcls-headline img").bounding_box()
        assert img["y"] + img["height"] <= 900 and img["y"] < first_code and img["height"] > 150, img
    wide = page.eval_on_selector_all("div.cell div.highlight pre, div.cell_output pre",
                                     "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).length")
    assert wide == 0, f"{wide} code or output blocks scroll sideways"
    colab = page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].split("github.com/")[1]
    assert any(h.endswith(f"{url}/blob/main/chapters/{chapter}.ipynb") for h in colab), colab
    page.close()


def test_the_claims_page_counts_its_rows_and_says_why_a_smoke_row_disagrees(site, browser):
    """The counts at the top equal the table's rows by verdict; on the smoke profile every expected "no" carries its
    reason (the MathJax, banner and console checks run in test_chapter_page)."""
    import re
    page = browser.new_page()
    page.goto(f"{site}/chapters/summary_claims.html", wait_until="load")
    text = page.inner_text("article")
    m = re.search(r"(\d+) claim rows on the smoke profile: (\d+) yes, (\d+) no, (\d+) not testable, (\d+) not computed", text)
    assert m, text[:2000]
    total, counts = int(m.group(1)), dict(zip(("yes", "no", "not testable", "not computed"), map(int, m.groups()[1:])))
    head = page.eval_on_selector_all(".cell_output table thead th", "els => els.map(e => e.innerText.trim())")
    rows = page.eval_on_selector_all(".cell_output table tbody tr",
                                     "els => els.map(r => Array.from(r.querySelectorAll('td')).map(c => c.innerText.trim()))")
    col = {name: i for i, name in enumerate(head)}
    assert len(rows) == total >= 40 and sum(counts.values()) == total
    for v, n in counts.items():
        assert sum(r[col["agrees"]].split(" (stale")[0] == v for r in rows) == n, v
    import base64, csv, io   # noqa: E401
    href = page.get_attribute("a[download='claims-smoke.csv']", "href")
    assert len(list(csv.DictReader(io.StringIO(base64.b64decode(href.split(",", 1)[1]).decode())))) == total
    notes = [r[col["on the smoke profile"]] for r in rows]
    assert all(n == "expected: yes" or n.startswith("expected: no -- ") for n in notes), notes
    # each row's section leads to the verdict line of its chapter's claims; each verdict has its colour
    links = page.eval_on_selector_all(".cell_output table tbody tr td:first-child a", "els => els.map(e => e.href)")
    assert len(links) == total, (len(links), total)
    for target in sorted(set(links)):
        other = browser.new_page()
        other.goto(target, wait_until="load")
        assert other.locator(f".regcls-verdict#{target.split('#')[1]}").count() == 1, target
        other.close()
    tint = page.eval_on_selector_all(f".cell_output table tbody tr td:nth-child({col['agrees'] + 1})",
                                     "els => els.map(e => [e.innerText.trim(), getComputedStyle(e).backgroundColor])")
    by_verdict = {}
    for v, c in tint:
        by_verdict.setdefault(v.split(" (stale")[0], set()).add(c)
    assert all(len(c) == 1 for c in by_verdict.values()) and len({c.pop() for c in by_verdict.values()}) == len(by_verdict)
    page.close()


def test_intro_draws_its_figure(site, browser):
    page = browser.new_page()
    page.goto(f"{site}/book/intro.html", wait_until="load")
    sizes = page.eval_on_selector_all(".cell_output img", "els => els.map(e => e.naturalWidth)")
    assert sizes and max(sizes) > 600  # the matplotlib figure of the patch integration assumption
    page.close()


def test_every_attention_map_has_its_colourbar():
    import matplotlib
    matplotlib.use("Agg")
    import numpy as np
    from regcls import plots

    rng = np.random.default_rng(0)
    fig = plots.map_grid([rng.random((28, 28, 3)) for _ in range(3)], {"g": rng.random((3, 4, 4)),
                                                                      "g+reg": rng.random((3, 4, 4)) * 1e-4})
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 6 and len(fig.axes) == 9 + 6
    assert bars[-1].get_ylabel() == "share of [CLS] attention"
    assert all(t.get_size() >= 9 for ax in bars for t in ax.get_yticklabels())


def test_a_legend_beside_the_bars_covers_none_of_them():
    """Bars reaching the top of the axes, legend included: the legend lies outside the axes and inside the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from regcls import plots

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax in axes:
        plots.interval_bars(ax, {s: {"patch": (1.0, 0.98, 1.0), "reg": (0.97, 0.9, 1.0)} for s in "SBLg"}, ("patch", "reg"))
        ax.set_ylim(0, 1.05)
    legend = plots.legend_beside(axes[0])
    plt.tight_layout()
    fig.canvas.draw()
    box, renderer = legend.get_window_extent(), fig.canvas.get_renderer()
    assert not box.overlaps(axes[0].get_window_extent()) and not box.overlaps(axes[1].get_window_extent())
    assert fig.bbox.contains(box.x1, box.y0) and all(t.get_size() >= 9 for t in legend.get_texts())
    assert not any(box.overlaps(b.get_window_extent(renderer)) for ax in axes for b in ax.patches)
    plt.close(fig)


def test_values_that_differ_read_differently():
    """The 'two extremes' of Sec. 3.1 when their shares tie at two decimals: as many decimals as tell them apart."""
    from regcls.plots import distinct

    assert distinct([0.5012, 0.5047, 0.93]) == ["0.501", "0.505", "0.930"]
    assert distinct([0.25, 0.75]) == ["0.25", "0.75"] and distinct([0.5, 0.5]) == ["0.50", "0.50"]
    assert distinct([1 / 3, 1 / 3 + 1e-9]) == ["0.333333", "0.333333"]   # no further than six digits
    assert distinct([5.1e-18, 7.2e-21, 0.0]) == ["5.1e-18", "7.2e-21", "0"]   # a planted control's tiny shares


def test_an_estimate_and_its_interval_share_one_cell():
    from regcls.plots import interval_table

    table = interval_table([{"size": "S", "CKA": 0.9661, "95% CI": "[0.950, 0.980]", "ratio": 2.0, "ratio 95% CI": "[1.9, 2.1]",
                             "note": "x", "95% CI ": "[0, 1]"}])
    df = table.data
    assert list(df.columns) == ["size", "CKA [95% CI]", "ratio [95% CI]", "note", "95% CI "]   # text keeps its own
    assert df.iloc[0].tolist() == ["S", "0.966 [0.950, 0.980]", "2.000 [1.9, 2.1]", "x", "[0, 1]"]


def test_a_figures_numbers_are_what_it_draws():
    """Grouped bars at their categories with their whiskers, stacked bars by their own height, lines (against
    categories too), points and map cells; a photo left out; the link downloads them as CSV."""
    import base64
    import csv
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from regcls import plots

    fig, (a, b, c, d) = plt.subplots(1, 4)
    plots.interval_bars(a, {"S": {"patch": (0.9, 0.8, 1.0), "reg": (0.5, 0.4, 0.6)},
                            "g": {"patch": (0.2, 0.1, 0.3), "reg": (0.7, 0.6, 0.8)}}, ("patch", "reg"))
    a.set_title("knockout")
    b.plot([1, 2], [3, 4], label="S")
    b.scatter([5], [6], label="images")
    c.imshow(np.zeros((2, 2, 3)))
    c.imshow(np.arange(6.0).reshape(2, 3))
    d.bar(["S", "g"], [0.2, 0.3], label="cls")
    d.bar(["S", "g"], [0.5, 0.6], bottom=[0.2, 0.3], label="reg")
    d.plot(["S", "g"], [1.0, 1.0], label="total")
    rows = plots.figure_numbers(fig)
    bars = [(r["series"], r["x"], r["y"]) for r in rows if r["kind"] == "bar" and r["panel"] == "knockout"]
    assert bars == [("patches only", "S", 0.9), ("patches only", "g", 0.2), ("registers only", "S", 0.5), ("registers only", "g", 0.7)]
    assert [(r["series"], r["x"], r["y"], r["y_high"]) for r in rows if r["kind"] == "segment"][:2] == \
        [("patches only, 95% interval", "S", 0.8, 1.0), ("patches only, 95% interval", "g", 0.1, 0.3)]
    assert [(r["x"], r["y"]) for r in rows if r["kind"] == "line" and r["series"] == "S"] == [(1.0, 3.0), (2.0, 4.0)]
    assert [(r["x"], r["y"], r["series"]) for r in rows if r["kind"] == "point"] == [(5.0, 6.0, "images")]
    assert [r["value"] for r in rows if r["kind"] == "map"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]   # the photo: no rows
    stacked = [(r["series"], r["x"], round(r["y"], 6)) for r in rows if r["kind"] == "bar" and r["panel"] == "panel 4"]
    assert stacked == [("cls", "S", 0.2), ("cls", "g", 0.3), ("reg", "S", 0.5), ("reg", "g", 0.6)]
    assert [(r["x"], r["y"]) for r in rows if r["series"] == "total"] == [("S", 1.0), ("g", 1.0)]
    html = plots.numbers(fig, "fig-x").data
    data = base64.b64decode(html.split("base64,")[1].split('"')[0]).decode()
    assert len(list(csv.DictReader(io.StringIO(data)))) == len(rows) and 'download="fig-x.csv"' in html
    plt.close(fig)


def test_a_folded_table_opens_on_a_click():
    from regcls import plots

    html = plots.folded(plots.interval_table([{"model": "S", "CKA": 0.5, "95% CI": "[0.4, 0.6]"}]), "Every choice (1 row)").data
    assert html.startswith('<details class="regcls-folded"><summary>Every choice (1 row)</summary>')
    assert "0.500 [0.4, 0.6]" in html and html.endswith("</details>")
