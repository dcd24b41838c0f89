"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package) loads the page,
decodes every figure and draws them. Not skipped when Chromium is missing: the suite needs it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from eval.report import write_report
from eval.results import write_result
from test_eval_report import result

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=10000"]

# A probe added to a copy of the page (the report itself has no scripts): after every image has
# loaded or failed, it writes what the browser decoded into the DOM that --dump-dom prints.
PROBE = """<script>window.addEventListener("load", () => {
  const seen = [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                               shown: i.getBoundingClientRect().width}));
  document.body.setAttribute("data-probe", JSON.stringify(seen));
});</script>"""


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: the test suite needs Debian's chromium (apt-get install -y chromium)")
    return exe


def _run(chromium, profile, *args) -> str:
    proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    d = root / "results"
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0), d)
    write_result(result("int8", "H100", 200_000_000, 10.1, 0.004, 90.0), d)
    write_result(result("int4", "H100", 110_000_000, 10.5, 0.02, 120.0), d)
    write_result(result("int4", "Jetson AGX Orin (MAXN)", 110_000_000, 10.5, 0.02, 20.0), d)
    md, page, _ = write_report([d], root / "rep")
    return root, page


def _svg_px(svg_bytes: bytes) -> tuple[float, float]:
    # matplotlib sizes its SVG in points; CSS maps 1pt to 4/3 px
    root = ET.fromstring(svg_bytes)
    return tuple(float(root.get(k).removesuffix("pt")) * 4 / 3 for k in ("width", "height"))


def test_page_loads_every_figure(chromium, report):
    root, page = report
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run(chromium, root / "profile-dom", "--dump-dom", probe.as_uri())
    m = re.search(r'data-probe="([^"]*)"', dom)
    assert m, dom[-2000:]
    seen = json.loads(m.group(1).replace("&quot;", '"'))
    assert [s["alt"] for s in seen] == ["KL divergence against size", "Perplexity against size", "Decode and prefill rates"]
    for s, name in zip(seen, ("kl_vs_size.svg", "ppl_vs_size.svg", "latency.svg")):
        w, h = _svg_px((page.parent / name).read_bytes())
        # decoded at the size the SVG declares: the browser parsed the document, not a broken-image icon
        assert s["complete"] and s["w"] == pytest.approx(w, abs=1) and s["h"] == pytest.approx(h, abs=1), (name, s)
        assert s["shown"] > 100


def test_screenshot_shows_the_figures(chromium, report):
    root, page = report
    shot = root / "shot.png"
    _run(chromium, root / "profile-shot", "--window-size=1400,1800", f"--screenshot={shot}", page.as_uri())
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1800)
    px = img.getdata()

    def near(rgb, tol=40):
        return sum(1 for p in px if sum(abs(a - b) for a, b in zip(p, rgb)) <= tol)

    # The tables are black on white with grey rules; only the figures draw in these colours:
    # markers and decode bars (#1f77b4), the Jetson's marker (#d62728), prefill bars (#ff7f0e).
    assert near((0x1F, 0x77, 0xB4)) > 2000
    assert near((0xD6, 0x27, 0x28)) > 20
    assert near((0xFF, 0x7F, 0x0E)) > 2000
    assert sum(1 for p in px if p != (255, 255, 255)) > 0.05 * img.size[0] * img.size[1]
