"""Reports from results files: ``report.md`` (tables) and ``report.html`` (tables and inline SVG
plots: quality against size, and latency with one column per device, so a GPU run and a
Jetson run sit side by side), with regressions flagged against a baseline.

Baseline: either the name of one result (every other result on the same device is compared
with it) or results of an earlier run (a file or folder; results are paired by name and
device). A result is flagged when its perplexity or KL grows, or its decode / prefill rate
drops, by more than the thresholds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from html import escape
from pathlib import Path

from eval import svg
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


def compare(result: dict, base: dict, t: Thresholds) -> list[str]:
    """Reasons ``result`` regressed against ``base`` (same device), empty when it did not."""
    out = []
    who = f"{result['name']} on {_dev(result)} vs {base['name']}"
    q, bq = result["quality"], base["quality"]
    if q["ppl"] > bq["ppl"] * (1 + t.ppl):
        out.append(f"{who}: ppl {q['ppl']:.4g} > {bq['ppl']:.4g} (+{q['ppl'] / bq['ppl'] - 1:.1%})")
    kl, bkl = q["kl"]["mean"], bq["kl"]["mean"]
    if kl > bkl * (1 + t.kl) and kl - bkl > KL_FLOOR:
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


def markdown(results: list[dict], flags: list[str]) -> str:
    lines = ["# Evaluation report", "", "## Quality", "",
             "| artifact | backend | device | size (MB) | ppl | KL mean | KL p99 | top-1 | towers (cos) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        q = r["quality"]
        tw = r.get("towers") or {}
        towers = ", ".join(f"{k} {v['cosine_mean']:.4f}" for k, v in tw.items() if isinstance(v, dict)) or "-"
        lines.append(f"| {r['name']} | {r['backend']} | {_dev(r)} | {_mb(r['artifact']['size_bytes']):.2f} | {q['ppl']:.4f} | "
                     f"{q['kl']['mean']:.6f} | {q['kl']['p99']:.5f} | {q['kl']['top1']:.4f} | {towers} |")
    devices, rows, values = _latency_rows(results)
    if rows:
        lines += ["", "## Latency (medians; one column per device)", "",
                  "| artifact | metric | " + " | ".join(devices) + " |", "|---|---|" + "---:|" * len(devices)]
        for name, m in rows:
            lines.append(f"| {name} | {m} | " + " | ".join(_fmt(values.get((name, m, d))) for d in devices) + " |")
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


def html(results: list[dict], flags: list[str]) -> str:
    quality_rows = []
    for r in results:
        q = r["quality"]
        quality_rows.append([r["name"], r["backend"], _dev(r), f"{_mb(r['artifact']['size_bytes']):.2f}", f"{q['ppl']:.4f}",
                             f"{q['kl']['mean']:.6f}", f"{q['kl']['p99']:.5f}", f"{q['kl']['top1']:.4f}"])
    pts_kl = [(_mb(r["artifact"]["size_bytes"]), r["quality"]["kl"]["mean"], r["name"], f"{r['backend']} / {_dev(r)}") for r in results]
    pts_ppl = [(_mb(r["artifact"]["size_bytes"]), r["quality"]["ppl"], r["name"], f"{r['backend']} / {_dev(r)}") for r in results]
    plots = [svg.scatter(pts_kl, "KL divergence against size", "artifact size (MB)", "mean KL (nats/token)"),
             svg.scatter(pts_ppl, "Perplexity against size", "artifact size (MB)", "perplexity")]
    devices, rows, values = _latency_rows(results)
    names = list(dict.fromkeys(r["name"] for r in results if r.get("latency")))
    lat_cells = []
    for d in devices:
        # Keep the longest prompt's numbers (the last row of each artifact).
        dec_last = {}
        pre_last = {}
        for (n, m) in rows:
            if (n, m, d) in values and m.startswith("decode tok/s"):
                dec_last[(n, "decode")] = values[(n, m, d)]
            if (n, m, d) in values and m.startswith("prefill tok/s"):
                pre_last[(n, "prefill")] = values[(n, m, d)]
        lat_cells.append(f"<td>{svg.bars(names, ['decode'], dec_last, f'decode tok/s: {d}', 'tokens/s')}"
                         f"{svg.bars(names, ['prefill'], pre_last, f'prefill tok/s: {d}', 'tokens/s')}</td>")
    lat_table = _table(["artifact", "metric", *devices],
                       [[n, m, *(_fmt(values.get((n, m, d))) for d in devices)] for n, m in rows]) if rows else "<p>no latency measured</p>"
    flag_html = "".join(f"<li class='flag'>{escape(f)}</li>" for f in flags) or "<li>none flagged</li>"
    lat_grid = (f"<table class='grid'><tr>{''.join(f'<th>{escape(d)}</th>' for d in devices)}</tr><tr>{''.join(lat_cells)}</tr></table>"
                if devices else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }}
table.grid td, table.grid th {{ border: none; text-align: center; }}
.flag {{ color: #b00; }}
</style></head><body>
<h1>Evaluation report</h1>
<h2>Quality</h2>
{_table(["artifact", "backend", "device", "size (MB)", "ppl", "KL mean", "KL p99", "top-1"], quality_rows)}
<div class="plots">{"".join(plots)}</div>
<h2>Latency (medians; one column per device)</h2>
{lat_grid}
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
    _write(md, markdown(results, flags))
    _write(page, html(results, flags))
    return md, page, flags
