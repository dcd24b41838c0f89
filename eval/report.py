"""Reports from results files: ``report.md`` and ``report.html`` (the same tables, and the same
matplotlib figures: KL on a log axis and perplexity against size, and decode / prefill rates
with one panel per device, so a GPU run and a Jetson run sit side by side; SVG files next to
report.md, embedded in the self-contained page), with regressions flagged against a baseline.

Baseline: either the name of one result (every other result on the same device is compared
with it) or results of an earlier run (a file or folder; results are paired by name and
device). A result is flagged when its perplexity or KL grows, or its decode / prefill rate
drops, by more than the thresholds.
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from html import escape
from pathlib import Path

from eval import figures
from eval.errors import EvalError
from eval.results import load_results
from eval.atomic_file import write_text_atomic

log = logging.getLogger(__name__)

KL_FLOOR = 1e-4  # KL differences below this are noise, even when relative change is large


@dataclass(frozen=True)
class Thresholds:
    ppl: float = 0.02
    kl: float = 0.10
    slowdown: float = 0.10


def _dev(r: dict) -> str:
    return r["device"]["label"]


def _mb(n) -> float | None:
    return None if n is None else n / 1e6


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _latency_rows(results: list[dict]) -> tuple[list[str], list[tuple[str, str]], dict]:
    """Devices (columns), (name, metric) rows, and values[(name, metric, device)]."""
    devices = list(dict.fromkeys(_dev(r) for r in results if r.get("latency")))
    rows: list[tuple[str, str]] = []
    values: dict = {}
    for r in results:
        lat = r.get("latency")
        if not lat:
            continue
        metrics = []
        for run in lat["runs"]:
            L = run["prompt_tokens"]
            metrics += [(f"TTFT @{L} (ms)", run["ttft_s"]["median"] * 1000), (f"prefill tok/s @{L}", run["prefill_tok_s"]),
                        (f"decode tok/s @{L}+{run['decode_tokens']}", run["decode_tok_s"])]
        mem = lat.get("memory") or {}
        for key, label in (("rss_peak_bytes", "peak RSS (MB)"), ("cuda_max_allocated_bytes", "CUDA max allocated (MB)"),
                           ("cuda_process_used_bytes", "CUDA used (MB)")):
            if mem.get(key) is not None:
                metrics.append((label, _mb(mem[key])))
        tg = lat.get("tegrastats") or {}
        if tg.get("ram_used_mb_max") is not None:
            metrics.append(("Jetson RAM max (MB)", float(tg["ram_used_mb_max"])))
        if tg.get("power_mw_mean") is not None:
            metrics.append(("power mean (W)", tg["power_mw_mean"] / 1000))
        for m, v in metrics:
            if (r["name"], m) not in rows:
                rows.append((r["name"], m))
            values[(r["name"], m, _dev(r))] = v
    return devices, rows, values


def _decode_rate(r: dict) -> float | None:
    lat = r.get("latency")
    return lat["runs"][-1]["decode_tok_s"] if lat and lat.get("runs") else None


def _prefill_rate(r: dict) -> float | None:
    lat = r.get("latency")
    return lat["runs"][-1]["prefill_tok_s"] if lat and lat.get("runs") else None


def _quality(r: dict, *keys):
    """A quality number, or None where the run did not measure it (eval's perplexity / KL switches)."""
    v = r.get("quality")
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def compare(result: dict, base: dict, t: Thresholds) -> list[str]:
    """Reasons ``result`` regressed against ``base`` (same device), empty when it did not."""
    out = []
    who = f"{result['name']} on {_dev(result)} vs {base['name']}"
    ppl, bppl = _quality(result, "ppl"), _quality(base, "ppl")
    if ppl is not None and bppl is not None and ppl > bppl * (1 + t.ppl):
        out.append(f"{who}: ppl {ppl:.4g} > {bppl:.4g} (+{ppl / bppl - 1:.1%})")
    kl, bkl = _quality(result, "kl", "mean"), _quality(base, "kl", "mean")
    if kl is not None and bkl is not None and kl > bkl * (1 + t.kl) and kl - bkl > KL_FLOOR:
        out.append(f"{who}: KL mean {kl:.4g} > {bkl:.4g}")
    for label, fn in (("decode", _decode_rate), ("prefill", _prefill_rate)):
        a, b = fn(result), fn(base)
        if a is not None and b is not None and a < b * (1 - t.slowdown):
            out.append(f"{who}: {label} {a:.4g} tok/s < {b:.4g} tok/s ({a / b - 1:.1%})")
    return out


def regressions(results: list[dict], baseline: str | None, t: Thresholds) -> list[str]:
    if not baseline:
        return []
    names = {r["name"] for r in results}
    flags = []
    if baseline in names:
        by_dev = {_dev(r): r for r in results if r["name"] == baseline}
        for r in results:
            if r["name"] != baseline and _dev(r) in by_dev:
                flags += compare(r, by_dev[_dev(r)], t)
        return flags
    if not Path(baseline).exists():
        raise EvalError(f"--baseline {baseline!r} is neither a result name ({', '.join(sorted(names))}) nor a results file or folder")
    earlier = {(r["name"], _dev(r)): r for r in load_results([baseline])}
    for r in results:
        if (b := earlier.get((r["name"], _dev(r)))) is not None:
            flags += compare(r, b, t)
    return flags


def _quality_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the quality table, shared by markdown and HTML so they show the same
    columns: one cosine column per tower that any result measured."""
    towers = list(dict.fromkeys(t for r in results for t, v in (r.get("towers") or {}).items() if isinstance(v, dict)))
    header = ["artifact", "backend", "device", "size (MB)", "ppl", "KL mean", "KL p99", "top-1", *(f"{t} cos (mean)" for t in towers)]
    rows = []
    for r in results:
        tw = r.get("towers") or {}
        rows.append([r["name"], r["backend"], _dev(r), f"{_mb(r['artifact']['size_bytes']):.2f}", _num(_quality(r, "ppl"), ".4f"),
                     _num(_quality(r, "kl", "mean"), ".6f"), _num(_quality(r, "kl", "p99"), ".5f"),
                     _num(_quality(r, "kl", "top1"), ".4f"),
                     *(f"{tw[t]['cosine_mean']:.4f}" if isinstance(tw.get(t), dict) else "-" for t in towers)])
    return header, rows


@dataclass(frozen=True)
class Plot:
    file: str  # written next to report.md, embedded in report.html
    title: str
    figure: object  # matplotlib Figure


def report_figures(results: list[dict]) -> list[Plot]:
    """KL (log axis) and perplexity against size; decode and prefill rates per device when any
    result has latency."""
    def pts(metric):
        return [figures.Point(_mb(r["artifact"]["size_bytes"]), metric(r), r["name"], f"{r['backend']} / {_dev(r)}")
                for r in results]

    plots = [Plot("kl_vs_size.svg", "KL divergence against size",
                  figures.scatter(pts(lambda r: _quality(r, "kl", "mean")), "KL divergence against size",
                                  "artifact size (MB)", "mean KL (nats/token, log scale)", log_y=True)),
             Plot("ppl_vs_size.svg", "Perplexity against size",
                  figures.scatter(pts(lambda r: _quality(r, "ppl")), "Perplexity against size", "artifact size (MB)", "perplexity"))]
    timed = [r for r in results if _decode_rate(r) is not None]
    if timed:
        devices = list(dict.fromkeys(_dev(r) for r in timed))
        names = list(dict.fromkeys(r["name"] for r in timed))
        values = {}
        for r in timed:
            values[(r["name"], "decode", _dev(r))] = _decode_rate(r)
            values[(r["name"], "prefill", _dev(r))] = _prefill_rate(r)
        plots.append(Plot("latency.svg", "Decode and prefill rates", figures.rate_bars(devices, names, values)))
    return plots


def markdown(results: list[dict], flags: list[str], plots: list[Plot]) -> str:
    header, rows = _quality_table(results)
    lines = ["# Evaluation report", "", "## Quality", "",
             "| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"![{p.title}]({p.file})" for p in plots if p.file != "latency.svg"]
    devices, lat_rows, values = _latency_rows(results)
    if lat_rows:
        lines += ["", "## Latency (medians; one column per device)", "",
                  "| artifact | metric | " + " | ".join(devices) + " |", "|---|---|" + "---:|" * len(devices)]
        for name, m in lat_rows:
            lines.append(f"| {name} | {m} | " + " | ".join(_fmt(values.get((name, m, d))) for d in devices) + " |")
        lines += [""] + [f"![{p.title}]({p.file})" for p in plots if p.file == "latency.svg"]
    lines += ["", "## Regressions", ""]
    lines += [f"- {f}" for f in flags] or ["none flagged"]
    s = results[0].get("settings", {})
    lines += ["", f"Windows: {s.get('n_windows')} x {s.get('seq_len')} tokens (second half scored), KL over the reference's "
              f"top-{s.get('kl_top_k')} tokens plus the rest mass, vocabulary {s.get('vocab')}.", ""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _img(plot: Plot, svg: str) -> str:
    # A data URI keeps the page one self-contained file, and gives each SVG its own document, so
    # the element ids matplotlib writes cannot collide between figures.
    data = base64.b64encode(svg.encode()).decode()
    return f'<figure><img src="data:image/svg+xml;base64,{data}" alt="{escape(plot.title)}"></figure>'


def html(results: list[dict], flags: list[str], plots: list[Plot], svgs: dict[str, str]) -> str:
    imgs = {p.file: _img(p, svgs[p.file]) for p in plots}
    devices, rows, values = _latency_rows(results)
    lat_table = _table(["artifact", "metric", *devices],
                       [[n, m, *(_fmt(values.get((n, m, d))) for d in devices)] for n, m in rows]) if rows else "<p>no latency measured</p>"
    flag_html = "".join(f"<li class='flag'>{escape(f)}</li>" for f in flags) or "<li>none flagged</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
.flag {{ color: #b00; }}
</style></head><body>
<h1>Evaluation report</h1>
<h2>Quality</h2>
{_table(*_quality_table(results))}
<div class="plots">{imgs["kl_vs_size.svg"]}{imgs["ppl_vs_size.svg"]}</div>
<h2>Latency (medians; one column per device)</h2>
{imgs.get("latency.svg", "")}
{lat_table}
<h2>Regressions</h2>
<ul>{flag_html}</ul>
</body></html>
"""


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def write_report(result_paths, out_dir: str | Path, baseline: str | None = None,
                 thresholds: Thresholds = Thresholds()) -> tuple[Path, Path, list[str]]:
    results = load_results(result_paths)
    flags = regressions(results, baseline, thresholds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    plots = report_figures(results)
    svgs = {p.file: figures.to_svg(p.figure) for p in plots}
    for name, text in svgs.items():
        _write(out / name, text)
    _write(md, markdown(results, flags, plots))
    _write(page, html(results, flags, plots, svgs))
    return md, page, flags
