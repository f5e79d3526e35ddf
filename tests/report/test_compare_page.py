"""The comparison's report.html in a real browser (headless Chromium) at a laptop's 1280 px and a phone's
390 px: the page never scrolls sideways, at 1280 px no table needs its own scrollbar, multi-line and empty
answers read as such (no U+FFFD), and every arm's colour is on the page; the projection's figures carry
two significant figures, never "0.0 hours"."""

from __future__ import annotations

import json
import shutil
import subprocess
from html import escape, unescape
from pathlib import Path

import pytest

from llm_neo.records import load
from llm_neo.records.compare import CompareResults, Example
from llm_neo.report.compare import plots, projection_table, write_report
from llm_neo.report.style import ARM_COLORS
from llm_neo.report.tables import format_duration, format_sig

DATA = Path(__file__).parent / "data"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium: the browser checks are skipped")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
LOOP = "The answer to the question:\n\nThe answer to the question:\n\nThe answer to the question: ..."
# Chromium's headless window is at least 500 px wide, so the page is laid out in an iframe of the width
# under test (srcdoc: the same origin as the wrapper, whose script measures it once loaded): the page's
# width against the frame's, and each table box's content width against its visible width (a table
# wider than its box scrolls inside it).
WRAPPER = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="page" style="border:0; width:{width}px; height:{height}px" srcdoc="{page}"></iframe>
<script>window.addEventListener("load", function () {{
  var w = document.getElementById("page").contentWindow, d = w.document.documentElement, wide = [];
  w.document.querySelectorAll(".table").forEach(function (t, i) {{
    if (t.scrollWidth > t.clientWidth + 1) wide.push(i);
  }});
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({{scroll: d.scrollWidth, inner: w.innerWidth, wide: wide}});
  document.body.appendChild(out);
}});</script></body></html>"""


def _results() -> CompareResults:
    """The fixture's comparison with planted answers: a looping multi-line one, an empty one, a long
    unbroken one and a long prompt; and a price per GPU-hour."""
    results = load(CompareResults, DATA / "compare-results.json")
    first = [g for g in results.groups if g.records == results.data.sizes[-1]]
    first[0].runs[0].examples[0] = Example(prompt="Add 100 and 1.", expected="101", answer=LOOP)
    first[1].runs[0].examples[0] = Example(prompt="Add 100 and 1.", expected="101", answer="")
    first[1].runs[0].examples[1] = Example(prompt="Add 101 and 1.", expected="102", answer="x" * 200)
    student = results.models.student.examples
    student[2] = Example(prompt="Plan a trip to " + "Lisbon and Porto " * 12, expected="A plan.", answer="")
    results.config["gpu_price"] = 2.5
    return results


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return write_report(_results(), out)["html"]


def test_answers_show_their_newlines_and_empty_ones_say_so(page):
    html = page.read_text()
    markdown = (page.parent / "report.md").read_text()
    assert "\ufffd" not in html and "\ufffd" not in markdown
    # The loop's lines: each newline a marked line break, in both renderings.
    assert "The answer to the question:↵<br>↵<br>The answer to the question:" in html
    assert "The answer to the question:↵<br>↵<br>The answer to the question:" in markdown
    assert html.count("<td>(empty)</td>") >= 2 and "| (empty) |" in markdown


def _framed(page: Path, width: int, height: int, tmp: Path, extra: str = "") -> Path:
    """A page showing ``page`` (with ``extra`` HTML at the end of its body) in a frame ``width`` px wide."""
    html = page.read_text().replace("</body>", extra + "</body>")
    framed = tmp / f"framed-{width}.html"
    framed.write_text(WRAPPER.format(width=width, height=height, page=escape(html, quote=True)))
    return framed


def _probe(page: Path, width: int, tmp: Path, extra: str = "") -> dict:
    framed = _framed(page, width, 900, tmp, extra)
    dom = subprocess.run(
        [BROWSER, *FLAGS, "--window-size=1400,1000", "--virtual-time-budget=5000", "--dump-dom",
         framed.as_uri()],
        capture_output=True, text=True, timeout=180,
    ).stdout  # fmt: skip
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    return json.loads(unescape(dom[start : dom.index("</pre>", start)]))


@needs_browser
@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_never_scrolls_sideways(page, tmp_path, width):
    probe = _probe(page, width, tmp_path)
    assert probe["inner"] == width  # the window had the width asked for: the check is of that width
    assert probe["scroll"] <= probe["inner"], probe
    if width == 1280:
        assert probe["wide"] == [], "a table needs its own scrollbar at 1280 px"


@needs_browser
def test_the_probe_sees_a_page_that_scrolls_sideways(page, tmp_path):
    # The check above can fail: a block wider than the window is seen.
    probe = _probe(page, 390, tmp_path, extra='<div style="width: 2000px">wide</div>')
    assert probe["scroll"] > probe["inner"]


@needs_browser
@pytest.mark.parametrize("width", [1280, 390])
def test_every_arm_s_colour_is_on_the_page(page, tmp_path, width):
    import matplotlib.image

    shot = tmp_path / f"report-{width}.png"
    framed = _framed(page, width, 12000, tmp_path)
    subprocess.run(
        [BROWSER, *FLAGS, f"--screenshot={shot}", "--window-size=1400,12000", framed.as_uri()],
        capture_output=True, timeout=180, check=True,
    )  # fmt: skip
    pixels = (matplotlib.image.imread(shot)[:, :width, :3] * 255).round()  # the frame
    arms = {g.method.split("+")[0] for g in load(CompareResults, DATA / "compare-results.json").groups}
    for arm in arms:
        colour = tuple(int(ARM_COLORS[arm][i : i + 2], 16) for i in (1, 3, 5))
        assert (abs(pixels - colour).max(axis=-1) < 6).sum() > 200, (arm, colour)


def test_the_projection_has_two_significant_figures(page):
    results = _results()
    assert results.cost.projection is not None
    rows, columns = projection_table(results.cost.projection, 2.5)
    assert columns == ["planned peak GiB", "fits one card", "time", "GPU-hours", "cost at 2.5/GPU-hour",
                       "time from"]  # fmt: skip
    # The fixture's tiny model: 2.6e-5 h for SFT, 1.7e-5 h for Neo; never "0.0".
    assert rows["SFT"]["time"] == "0.093 s" and rows["Neo"]["time"] == "0.062 s"
    assert rows["SFT"]["GPU-hours"] == "0.000026" and rows["Neo"]["GPU-hours"] == "0.000017"
    assert rows["SFT"]["cost at 2.5/GPU-hour"] == "0.000065"
    markdown = (page.parent / "report.md").read_text()
    assert "| SFT | 0.00365 | yes | 0.093 s | 0.000026 | 0.000065 |" in markdown
    assert "| 0.0 |" not in markdown.split("### Projection")[1].split("##")[0]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0139 * 3600, "50 s"),  # issue 20's Neo: 0.0139 h
        (0.093, "0.093 s"),
        (59.4, "59 s"),
        (59.7, "1.0 min"),  # rounds up to a minute: said in minutes
        (3000, "50 min"),
        (3571, "1.0 h"),
        (12345, "3.4 h"),
        (4.4e6, "1,200 h"),
    ],
)
def test_a_duration_reads_in_its_unit_to_two_significant_figures(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0139, "0.014"), (2.6e-5, "0.000026"), (1234, "1,200"), (9.96, "10"), (99.6, "100"), (1.0, "1.0")],
)
def test_two_significant_figures_in_plain_notation(value, text):
    assert format_sig(value) == text


def _pixels_of(png: bytes, colour: str, width_share: float = 0.7) -> int:
    """How many pixels of the plot's left ``width_share`` (the axes, not the legend beside them) are
    ``colour``."""
    import io

    import matplotlib.image

    pixels = (matplotlib.image.imread(io.BytesIO(png))[:, :, :3] * 255).round()
    pixels = pixels[:, : int(width_share * pixels.shape[1])]
    rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return int((abs(pixels - rgb).max(axis=-1) < 6).sum())


def test_arms_on_one_point_are_all_drawn_in_full_colour():
    # SFT and every Neo arm at the same memory and score (SFT and KD at 2.2 GiB in issue 20): SFT, drawn
    # first, is still mostly in sight, in its own colour, and Neo's is there too.
    results = _results()
    main = [g for g in results.groups if g.records == results.data.sizes[-1]]
    for g in main:
        g.stats.peak_tensor_memory_gb = main[0].stats.peak_tensor_memory_gb
        g.stats.accuracy = main[0].stats.accuracy
    together = plots(results)["memory"]
    results.groups = [g for g in results.groups if g.method == "sft"]
    alone = plots(results)["memory"]
    sft, neo = ARM_COLORS["sft"], ARM_COLORS["neo"]
    assert _pixels_of(together, sft) >= 0.5 * _pixels_of(alone, sft) > 0
    assert _pixels_of(together, neo) > 0
