"""Conversion cost: wall time and peak RSS of our pipeline against llama.cpp's convert-then-quantize.

    python bench/conversion_cost.py                         # tiny trained model only
    python bench/conversion_cost.py --sizes tiny e4b-8      # plus E4B widths, 8 layers
    python bench/conversion_cost.py --sizes e4b             # E4B shapes, all 35 layers (~14 GB bf16)

For each size, each side runs as its own child process (``OMP_NUM_THREADS`` and ``--threads``
pinned); a sampler reads each process's own high-water mark (``VmHWM``) every 50 ms and gives
the peak RSS (see ``measure`` for why not ``ru_maxrss``), and the peak summed RSS of the tree.

- ours, RTN: ``python -m quantize run`` from safetensors straight to an int4 (Q4_0) text GGUF;
- ours, GPTQ (``--gptq``; tiny only by default, it calibrates on the CPU): the same with GPTQ;
- llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` (the vendored converter and its gguf-py)
  then ``llama-quantize ... Q4_0`` (the built tool, else ``llama_model_quantize`` in a child).

Sizes: ``tiny`` (the tiny trained model), ``e4b`` (random bf16 weights with E4B's real text
widths, made by ``bench/synthetic_e4b.py``), ``e4b-N`` (E4B widths with N layers). A size is
skipped, with the reason in the results, when the disk or the available memory cannot hold it.
Results: ``--out``/conversion_cost.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30
# llama.cpp's converter peaked at ~22.5 GiB on E4B shapes (13.7 GB of bf16): ~1.65x the checkpoint
# (11.7 GiB VmHWM for the 6.4 GiB of E4B widths with 16 layers: its f32 copy of the per-layer table).
CONVERTER_PEAK_PER_BYTE = 1.65
# Ours streams row pieces: 0.72 GiB VmHWM for the same 16-layer checkpoint, whatever the table size.
OURS_PEAK_PER_BYTE = 0.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny"])
    # 1 by default: on this shared 2-core machine torch's 2-thread pool spins and made our GPTQ
    # path ~8x slower (9+ min instead of 71 s on the tiny model) while other jobs ran.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gptq", action="store_true", help="also time our GPTQ path (on the tiny size)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-conversion"))
    p.add_argument("--tools", default=str(ROOT / ".cache" / "llama.cpp-tools" / "tools.json"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and GGUF files")
    p.add_argument("--no-memory-guard", action="store_true",
                   help="run llama.cpp's converter even where its expected peak exceeds the available memory "
                        "(E4B: ~22 GiB of 23; the kernel's OOM killer ends it if it does not fit)")
    return p.parse_args(argv)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def _vm_hwm(pid: int) -> int:
    """The kernel's high-water mark of one process's resident set (``VmHWM``), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p.pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def measure(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run ``cmd``; wall seconds and peak memory.

    ``peak_rss_bytes`` is the largest ``VmHWM`` (the kernel's own per-process high-water mark,
    which starts afresh at exec) of any process in the child's tree, read every 50 ms; VmHWM
    only grows, so the last reading before exit is the peak up to the final 50 ms. The
    ``ru_maxrss`` that ``wait4`` returns is kept as ``ru_maxrss_bytes`` but not used: Linux
    charges a child, at exec, with the high-water mark of the memory it was spawned from, i.e.
    of this benchmark process (which may just have written a multi-GB synthetic checkpoint), so
    it over-states small children. ``peak_tree_rss_bytes``: the largest sampled sum of RSS."""
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak_tree = [0]
        hwm: dict[int, int] = {}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak_tree[0] = max(peak_tree[0], _tree_rss(proc.pid))
                for pid in _tree_pids(proc.pid):
                    hwm[pid] = max(hwm.get(pid, 0), _vm_hwm(pid))
                done.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-12:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log_path}:\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": max(hwm.values(), default=0),
            "ru_maxrss_bytes": ru.ru_maxrss * 1024, "peak_tree_rss_bytes": peak_tree[0]}


def recipe_yaml(model: Path, out: Path, text: str, force: bool) -> str:
    return json.dumps({
        "version": 1, "name": out.name, "model": str(model), "output": str(out), "seed": 0,
        "calibration": {"text": {"source": "embedded", "n_samples": 32, "seq_len": 256},
                        "images": {"n_samples": 0}, "audio": {"n_samples": 0}},
        "towers": {"text": text, "token_embeddings": "int8_row", "per_layer_embeddings": "int8_row",
                   "per_layer_projections": "keep", "altup_laurel": "keep", "vision": "keep", "audio": "keep",
                   "embedders": "keep"},
        "exports": {"gguf": {"mix": "auto", "mmproj": False, "force": force}},
    })  # JSON is YAML


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def size_model(size: str, work: Path) -> tuple[Path | None, str | None]:
    """(model folder, None) or (None, why it is skipped)."""
    from quantize.tiny import cached_tiny

    if size == "tiny":
        return cached_tiny("trained"), None
    if size != "e4b" and not size.startswith("e4b-"):
        raise SystemExit(f"unknown size {size!r}; valid: tiny, e4b, e4b-N (N layers)")
    from bench.synthetic_e4b import n_params, text_config, write_checkpoint

    layers = 35 if size == "e4b" else int(size.split("-", 1)[1])
    need = 2 * n_params(text_config(layers))
    free = shutil.disk_usage(work).free
    # checkpoint + our int4 GGUF (~0.3x) + llama.cpp's F16 (1x) and Q4_0 (~0.3x) files
    if free < 2.8 * need:
        return None, f"needs about {2.8 * need / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free"
    folder = work / f"synthetic-{size}"
    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing {size} checkpoint ({need / GiB:.1f} GiB bf16) to {folder}", flush=True)
        write_checkpoint(folder, cached_tiny("trained"), layers)
    return folder, None


def run_size(size: str, args, tools, work: Path) -> dict:
    model, why = size_model(size, work)
    if model is None:
        return {"size": size, "skipped": why}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    res: dict = {"size": size, "model": str(model), "checkpoint_bytes": checkpoint_bytes(model)}
    cfg = json.loads((model / "config.json").read_text())["text_config"]
    force = cfg["num_hidden_layers"] != 25 and cfg["num_hidden_layers"] != 35
    sw = work / size
    sw.mkdir(parents=True, exist_ok=True)
    ours_need = OURS_PEAK_PER_BYTE * res["checkpoint_bytes"] + 1 * GiB
    if mem_available() < ours_need:
        res["skipped"] = (f"our pipeline is expected to need about {ours_need / GiB:.1f} GiB, "
                          f"{mem_available() / GiB:.1f} GiB available now; not run, so as not to push the machine into the OOM killer")
        return res
    steps = [("rtn", "int4")] + ([("gptq", "int4_gptq")] if args.gptq and size == "tiny" else [])
    for label, scheme in steps:
        out = sw / f"ours-{label}"
        recipe = sw / f"ours-{label}.yaml"
        recipe.write_text(recipe_yaml(model, out, scheme, force))
        print(f"[{size}] ours ({label}) ...", flush=True)
        m = measure([sys.executable, "-m", "quantize", "run", recipe], env, sw / f"ours-{label}.log")
        m["gguf_bytes"] = sum(f.stat().st_size for f in out.glob("*.gguf"))
        res[f"ours_{label}"] = m
        print(f"[{size}] ours ({label}): {m['wall_s']:.1f} s, peak {m['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    need = CONVERTER_PEAK_PER_BYTE * res["checkpoint_bytes"] + 1 * GiB
    if tools.converter is None:
        res["llamacpp"] = {"skipped": "convert_hf_to_gguf.py not found (run bench/build_llamacpp_tools.sh)"}
        return res
    if mem_available() < need and not args.no_memory_guard:
        res["llamacpp"] = {"skipped": f"llama.cpp's converter needs about {need / GiB:.1f} GiB, "
                                      f"{mem_available() / GiB:.1f} GiB available now"}
        return res
    f16 = sw / "llamacpp-F16.gguf"
    q4 = sw / "llamacpp-Q4_0.gguf"
    print(f"[{size}] llama.cpp convert_hf_to_gguf --outtype f16 ...", flush=True)
    conv = measure([sys.executable, tools.converter, model, "--outtype", "f16", "--outfile", f16],
                   dict(env, PYTHONPATH=f"{tools.gguf_py}"), sw / "llamacpp-convert.log")
    print(f"[{size}] llama.cpp convert: {conv['wall_s']:.1f} s, peak {conv['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    if tools.has("llama-quantize"):
        qcmd = [tools.exe("llama-quantize"), f16, q4, "Q4_0", args.threads]
    else:
        qcmd = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench.llamacpp_tools import "
                "quantize_plain; from pathlib import Path; quantize_plain(Path(sys.argv[2]), Path(sys.argv[3]), 'Q4_0', "
                "int(sys.argv[4]))", ROOT, f16, q4, args.threads]
    quant = measure(qcmd, env, sw / "llamacpp-quantize.log")
    print(f"[{size}] llama.cpp quantize: {quant['wall_s']:.1f} s, peak {quant['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    res["llamacpp"] = {"convert": conv, "quantize": quant,
                       "wall_s": round(conv["wall_s"] + quant["wall_s"], 2),
                       "peak_rss_bytes": max(conv["peak_rss_bytes"], quant["peak_rss_bytes"]),
                       "f16_bytes": f16.stat().st_size, "gguf_bytes": q4.stat().st_size}
    r = res["ours_rtn"]
    res["ratio_rtn"] = {"wall": r["wall_s"] / res["llamacpp"]["wall_s"],
                        "peak_rss": r["peak_rss_bytes"] / res["llamacpp"]["peak_rss_bytes"]}
    if not args.keep:
        f16.unlink(missing_ok=True)
        q4.unlink(missing_ok=True)
    return res


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| size | checkpoint GiB | ours RTN s | ours RTN peak GiB | ours GPTQ s | ours GPTQ peak GiB | "
             "llama.cpp convert+quantize s | llama.cpp peak GiB | wall ratio | RSS ratio | target (<= 0.7x wall, <= 0.5x RSS) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['size']} | skipped: {r['skipped']} |||||||||||")
            continue
        o, g, l = r.get("ours_rtn", {}), r.get("ours_gptq"), r.get("llamacpp", {})
        ratio = r.get("ratio_rtn")
        verdict = "-" if ratio is None else ("met" if ratio["wall"] <= 0.7 and ratio["peak_rss"] <= 0.5 else
                                              "WORSE: " + ", ".join(x for x, ok in (("wall", ratio["wall"] <= 0.7),
                                                                                    ("RSS", ratio["peak_rss"] <= 0.5)) if not ok) + " missed")
        lines.append("| {} | {:.2f} | {:.1f} | {:.2f} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["size"], r["checkpoint_bytes"] / GiB, o["wall_s"], o["peak_rss_bytes"] / GiB,
            f"{g['wall_s']:.1f}" if g else "-", f"{g['peak_rss_bytes'] / GiB:.2f}" if g else "-",
            f"{l['wall_s']:.1f}" if "wall_s" in l else l.get("skipped", "-"),
            f"{l['peak_rss_bytes'] / GiB:.2f}" if "peak_rss_bytes" in l else "-",
            f"{ratio['wall']:.3f}" if ratio else "-", f"{ratio['peak_rss']:.3f}" if ratio else "-", verdict))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from eval.atomic_file import write_text_atomic

    args = parse_args(argv)
    from bench.llamacpp_tools import find_tools

    tools = find_tools(args.tools)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        results.append(run_size(size, args, tools, work))
        if not args.keep and size != "tiny":
            shutil.rmtree(work / f"synthetic-{size}", ignore_errors=True)
    cmd = "python bench/conversion_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Conversion cost, ours vs llama.cpp\n\n`{cmd.strip()}`, {args.threads} threads, {os.cpu_count()} cores, "
              f"{Path('/proc/meminfo').read_text().split()[1]} kB RAM, load average {os.getloadavg()[0]:.1f} at the end, "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}. Ours: safetensors -> int4 (Q4_0) text GGUF in one "
              "process. llama.cpp: convert_hf_to_gguf.py --outtype f16, then llama-quantize Q4_0; its wall time is the "
              "sum, its peak the larger of the two.")
    md = markdown(results, header)
    out = Path(args.out)
    for name, text in (("conversion_cost.json", json.dumps({"command": cmd.strip(), "threads": args.threads,
                                                               "results": results}, indent=1, default=str)),
                       ("conversion_cost.md", md)):
        write_text_atomic(out / name, text)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
