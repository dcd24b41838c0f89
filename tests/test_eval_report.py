"""eval.report: tables, well-formed inline SVG plots, one latency column per device, regression flags."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from eval.cli import main
from eval.report import Thresholds, write_report
from eval.results import SCHEMA_VERSION, write_result


def result(name, device, size, ppl, kl, decode, prefill=100.0):
    return {
        "schema_version": SCHEMA_VERSION, "name": name, "backend": "llamacpp",
        "artifact": {"path": f"/x/{name}", "kind": "gguf", "size_bytes": size, "sha256": "0" * 64},
        "device": {"kind": "cuda", "label": device, "fingerprint": {}},
        "settings": {"seq_len": 512, "n_windows": 4, "kl_top_k": 32, "vocab": 4352},
        "quality": {"ppl": ppl, "kl": {"mean": kl, "median": kl, "p99": 3 * kl, "max": 4 * kl, "top1": 0.9, "n_tokens": 1020}},
        "latency": {"runs": [{"prompt_tokens": 64, "decode_tokens": 32, "ttft_s": {"median": 64 / prefill},
                              "decode_s": {"median": 32 / decode}, "prefill_tok_s": prefill, "decode_tok_s": decode}],
                    "memory": {"rss_peak_bytes": 2_000_000}, "tegrastats": None},
        "towers": None,
    }


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def svgs(page: str) -> list[ET.Element]:
    out, start = [], 0
    while (i := page.find("<svg", start)) >= 0:
        j = page.index("</svg>", i) + len("</svg>")
        out.append(ET.fromstring(page[i:j]))  # raises on malformed XML
        start = j
    return out


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    write_result(result("reference", "H100", 400_000_000, 10.0, 0.0, 50.0), d)
    write_result(result("int4", "H100", 110_000_000, 10.5, 0.02, 120.0), d)
    write_result(result("reference", "Jetson AGX Orin (MAXN)", 400_000_000, 10.0, 0.0, 8.0), d)
    write_result(result("int4", "Jetson AGX Orin (MAXN)", 110_000_000, 10.5, 0.02, 20.0), d)
    return d


def test_report_tables_and_plots(results_dir, tmp_path):
    md, page, flags = write_report([results_dir], tmp_path / "rep")
    text = md.read_text()
    assert "| int4 | llamacpp | H100 | 110.00 | 10.5000 | 0.020000 | 0.06000 | 0.9000 | - |" in text
    # one latency column per device, side by side
    assert "| artifact | metric | H100 | Jetson AGX Orin (MAXN) |" in text
    assert "| int4 | decode tok/s @64+32 | 120 | 20 |" in text
    html = page.read_text()
    p = Collector()
    p.feed(html)
    assert p.tags.count("table") >= 3 and "script" not in p.tags and "link" not in p.tags  # self-contained
    plots = svgs(html)
    assert len(plots) == 2 + 2 * 2  # KL and ppl vs size; decode and prefill bars per device
    titles = [e.find("{http://www.w3.org/2000/svg}title").text for e in plots]
    assert "KL divergence against size" in titles and "decode tok/s: Jetson AGX Orin (MAXN)" in titles
    circles = [c for c in plots[0].iter("{http://www.w3.org/2000/svg}circle")]
    assert len(circles) == 4
    assert flags == []


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
