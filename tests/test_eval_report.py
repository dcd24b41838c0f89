"""eval.report: tables (the same columns in markdown and HTML), matplotlib figures (log-scaled KL,
labels that do not overlap), one latency column per device, regression flags, byte-identical
output for the same results. The page in a real browser: tests/test_report_browser.py."""
from __future__ import annotations

import base64
import itertools
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from matplotlib.text import Text

from eval.cli import main
from eval.report import Thresholds, report_figures, write_report
from eval.results import SCHEMA_VERSION, load_results, write_result

SVG_NS = "{http://www.w3.org/2000/svg}"


def result(name, device, size, ppl, kl, decode, prefill=100.0, towers=None):
    return {
        "schema_version": SCHEMA_VERSION, "name": name, "backend": "llamacpp",
        "artifact": {"path": f"/x/{name}", "kind": "gguf", "size_bytes": size, "sha256": "0" * 64},
        "device": {"kind": "cuda", "label": device, "fingerprint": {}},
        "settings": {"seq_len": 512, "n_windows": 4, "kl_top_k": 32, "vocab": 4352},
        "quality": {"ppl": ppl, "kl": {"mean": kl, "median": kl, "p99": 3 * kl, "max": 4 * kl, "top1": 0.9, "n_tokens": 1020}},
        "latency": {"runs": [{"prompt_tokens": 64, "decode_tokens": 32, "ttft_s": {"median": 64 / prefill},
                              "decode_s": {"median": 32 / decode}, "prefill_tok_s": prefill, "decode_tok_s": decode}],
                    "memory": {"rss_peak_bytes": 2_000_000}, "tegrastats": None},
        "towers": towers,
    }


class Tables(HTMLParser):
    """Every <table> as rows of cell texts, and every <img>'s attributes."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.tags, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def parse(page: str) -> Tables:
    p = Tables()
    p.feed(page)
    return p


def md_table(text: str, first_header: str) -> list[list[str]]:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0), d)
    write_result(result("int4", "H100", 110_000_000, 10.5, 0.02, 120.0), d)
    write_result(result("reference", "Jetson AGX Orin (MAXN)", 400_000_000, 10.0, 0.0, 8.0), d)
    write_result(result("int4", "Jetson AGX Orin (MAXN)", 110_000_000, 10.5, 0.02, 20.0), d)
    return d


@pytest.fixture
def crowded(tmp_path):
    """Five artifacts within 4 MB of each other and one far away: labels at a fixed offset from
    their points would cover each other in both scatter plots."""
    d = tmp_path / "crowded"
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0), d)
    for i in range(5):
        write_result(result(f"int4-variant-{i}", "H100", 110_000_000 + i * 1_000_000, 10.5 + 0.01 * i, 0.02 + 0.0005 * i, 120.0), d)
    write_result(result("int4-variant-0", "Jetson AGX Orin (MAXN)", 110_000_000, 10.5, 0.02, 20.0), d)
    return d


def test_report_tables_and_plots(results_dir, tmp_path):
    md, page, flags = write_report([results_dir], tmp_path / "rep")
    text = md.read_text()
    assert "| int4 | llamacpp | H100 | 110.00 | 10.5000 | 0.020000 | 0.06000 | 0.9000 |" in text
    # one latency column per device, side by side
    assert "| artifact | metric | H100 | Jetson AGX Orin (MAXN) |" in text
    assert "| int4 | decode tok/s @64+32 | 120 | 20 |" in text
    html = page.read_text()
    p = parse(html)
    assert len(p.tables) == 2 and "script" not in p.tags and "link" not in p.tags  # self-contained
    # the markdown links the figure files next to it; the page embeds the same bytes
    files = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert files == ["kl_vs_size.svg", "ppl_vs_size.svg", "latency.svg"]
    assert len(p.imgs) == 3
    for f, img in zip(files, p.imgs):
        svg = (md.parent / f).read_bytes()
        prefix = "data:image/svg+xml;base64,"
        assert img["src"].startswith(prefix) and base64.b64decode(img["src"][len(prefix):]) == svg
        root = ET.fromstring(svg)  # raises on malformed XML
        assert root.tag == f"{SVG_NS}svg" and float(root.get("width").removesuffix("pt")) > 100
    # the latency figure has one panel per device, titled with the device's label
    lat = report_figures(load_results([results_dir]))[2].figure
    assert [ax.get_title() for ax in lat.axes] == ["H100", "Jetson AGX Orin (MAXN)"]
    assert [t.get_text() for t in lat.axes[1].get_xticklabels()] == ["int4", "reference"]
    assert flags == []


def test_tower_columns_match_between_markdown_and_html(tmp_path):
    d = tmp_path / "results"
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0,
                        towers={"vision": {"cosine_mean": 1.0, "cosine_min": 1.0, "n": 2},
                                "audio": {"cosine_mean": 1.0, "cosine_min": 1.0, "n": 2}}), d)
    write_result(result("int8", "H100", 200_000_000, 10.1, 0.004, 80.0,
                        towers={"vision": {"cosine_mean": 0.99912, "cosine_min": 0.998, "n": 2},
                                "audio": {"cosine_mean": 0.98765, "cosine_min": 0.97, "n": 2}}), d)
    write_result(result("q4-gguf", "H100", 100_000_000, 10.6, 0.03, 120.0,
                        towers={"skipped": "tower checks need the transformers backend (this is llamacpp)"}), d)
    md, page, _ = write_report([d], tmp_path / "rep")
    want_header = ["artifact", "backend", "device", "size (MB)", "ppl", "KL mean", "KL p99", "top-1",
                   "audio cos (mean)", "vision cos (mean)"]  # results files store keys sorted
    markdown_rows = md_table(md.read_text(), "artifact")
    html_rows = parse(page.read_text()).tables[0]
    assert markdown_rows == html_rows
    assert html_rows[0] == want_header
    by_name = {row[0]: row for row in html_rows[1:]}
    assert by_name["int8"][-2:] == ["0.9877", "0.9991"]  # hand-rounded from the results
    assert by_name["q4-gguf"][-2:] == ["-", "-"]


def test_kl_axis_is_log_scaled(tmp_path):
    d = tmp_path / "results"
    for i, kl in enumerate((0.001, 0.004, 0.016, 0.064)):  # a factor of 4 apart
        write_result(result(f"q{i}", "H100", (100 + 50 * i) * 1_000_000, 10.0 + i, kl, 100.0), d)
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0), d)
    kl_fig = report_figures(load_results([d]))[0].figure
    ax = kl_fig.axes[0]
    assert ax.get_yscale() == "log"
    kl_fig.canvas.draw()
    # on a log axis equal ratios are equal distances on the page: measured in pixels
    ys = sorted(ax.transData.transform(xy)[1] for xy in ax.collections[0].get_offsets())
    gaps = [b - a for a, b in itertools.pairwise(ys)]
    assert max(gaps) - min(gaps) < 0.01 * gaps[0] and gaps[0] > 20
    # KL 0 cannot sit on a log axis: the reference is named under it rather than dropped silently
    assert "not on the log axis (0): reference" in ax.get_xlabel()


@pytest.mark.parametrize("which", [0, 1])
def test_point_labels_do_not_overlap(crowded, which):
    fig = report_figures(load_results([crowded]))[which].figure
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    # one label per position: int4-variant-0 was measured on two devices at the same point
    want = [f"int4-variant-{i}" for i in range(5)] + (["reference"] if which == 1 else [])  # KL 0 is off the log axis
    assert sorted(t.get_text() for t in labels) == want
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    # and no label covers a marker
    points = [ax.transData.transform(xy) for c in ax.collections for xy in c.get_offsets()]
    for box in boxes:
        for x, y in points:
            assert not (box.x0 < x < box.x1 and box.y0 < y < box.y1)
    fig_box = fig.bbox
    assert all(fig_box.x0 <= b.x0 and b.x1 <= fig_box.x1 and fig_box.y0 <= b.y0 and b.y1 <= fig_box.y1 for b in boxes)


def test_same_results_give_identical_files(crowded, tmp_path):
    write_report([crowded], tmp_path / "a")
    write_report([crowded], tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["kl_vs_size.svg", "latency.svg", "ppl_vs_size.svg", "report.html", "report.md"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_regressions_against_a_named_baseline(results_dir, tmp_path):
    write_result(result("int4-bad", "H100", 110_000_000, 11.0, 0.05, 40.0), results_dir)
    _, _, flags = write_report([results_dir], tmp_path / "rep", baseline="int4", thresholds=Thresholds())
    joined = "\n".join(flags)
    assert "int4-bad on H100 vs int4: ppl" in joined and "KL mean" in joined and "decode 40 tok/s < 120 tok/s" in joined
    assert "reference on H100" in joined  # slower than int4 on decode
    assert not any("Jetson" in f and "int4-bad" in f for f in flags)  # no int4-bad result on the Jetson


def test_regressions_against_an_earlier_run(results_dir, tmp_path):
    now = tmp_path / "now"
    write_result(result("int4", "H100", 110_000_000, 10.5, 0.02, 100.0), now)  # 17% slower decode
    _, _, flags = write_report([now], tmp_path / "rep", baseline=str(results_dir))
    assert len(flags) == 1 and "decode 100 tok/s < 120 tok/s" in flags[0]


def test_cli_errors_exit_2(results_dir, tmp_path, capsys):
    assert main(["report", str(results_dir), "--out", str(tmp_path / "r"), "--baseline", "nope"]) == 2
    assert "neither a result name" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 99}))
    assert main(["report", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "schema_version 99" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing"), "--reference", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
