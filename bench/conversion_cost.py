"""Conversion cost: wall time and peak RSS of our pipeline against llama.cpp's convert-then-quantize.

    python bench/conversion_cost.py                         # tiny trained model only
    python bench/conversion_cost.py --sizes tiny e4b-8      # plus E4B widths, 8 layers
    python bench/conversion_cost.py --sizes e4b             # E4B shapes, all 35 layers (~14 GB bf16)
    python bench/conversion_cost.py --types Q4_0 Q4_K_M     # also llama.cpp's Q4_K_M mix

For each size, each side runs as its own child process (``OMP_NUM_THREADS`` and ``--threads``
pinned); a sampler reads each process's own high-water mark (``VmHWM``) every 50 ms and gives
the peak RSS (see ``measure`` for why not ``ru_maxrss``), and the peak summed RSS of the tree.

- ours, RTN: ``python -m quantize run`` from safetensors straight to a text GGUF of each
  ``--types`` entry: ``Q4_0``, int4 g32 (Q4_0 blocks bit for bit); ``Q4_K_M``, the GGUF export's
  ``mix: Q4_K_M`` (llama.cpp's per-tensor types, encoded from the float weights) with the towers
  of bench/compare_llamacpp.py's ``ours-Q4_K_M`` file, RTN (no calibration);
- ours, GPTQ (``--gptq``; type Q4_0, tiny only, it calibrates on the CPU): the same with GPTQ;
- llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` (the vendored converter and its gguf-py)
  then ``llama-quantize ... TYPE`` (the built tool, else ``llama_model_quantize`` in a child).
  The F16 file is converted once per size; each type's llama.cpp wall time counts that convert.

Each type's two GGUFs are compared tensor by tensor (``gguf``'s reader): every tensor whose GGUF
type differs, or that only one file has, is listed in the results.

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
# per type: (most wall time, most peak RSS) of ours as a fraction of llama.cpp's convert + quantize
TARGETS = {"Q4_0": (0.7, 0.5), "Q4_K_M": (1.0, 0.5)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny"])
    # 1 by default: on this shared 2-core machine torch's 2-thread pool spins and made our GPTQ
    # path ~8x slower (9+ min instead of 71 s on the tiny model) while other jobs ran.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--types", nargs="+", default=["Q4_0"], choices=sorted(TARGETS),
                   help="GGUF types to convert to, each against llama-quantize of the same type")
    p.add_argument("--gptq", action="store_true", help="also time our GPTQ path (type Q4_0, tiny size)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None,
                   help="results as conversion_cost-TAG (another machine's rows, e.g. avx2)")
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-conversion"))
    p.add_argument("--tools", default=str(ROOT / ".cache" / "llama.cpp-tools" / "tools.json"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and GGUF files")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the synthetic checkpoints (for reuse), delete the GGUF files")
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
    # CPU seconds of the child and the descendants it waited for: on a shared machine a fairer
    # comparison than wall time, which also counts the neighbours' share of the cores
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_bytes": max(hwm.values(), default=0),
            "ru_maxrss_bytes": ru.ru_maxrss * 1024, "peak_tree_rss_bytes": peak_tree[0]}


def recipe_yaml(model: Path, out: Path, text: str, force: bool, qtype: str = "Q4_0") -> str:
    """Our recipe for one GGUF type. Q4_0: int4 g32 text (exact Q4_0 blocks), int8 tables.
    Q4_K_M: bench/compare_llamacpp.py's ``ours-Q4_K_M`` (text and per-layer projections int4,
    the rest kept, per_layer_model_projection left as it is, ``mix: Q4_K_M``), RTN: a named mix
    encodes RTN tensors from their float weights on llama.cpp's grids, so no calibration runs."""
    calib = {"text": {"source": "embedded", "n_samples": 32, "seq_len": 256},
             "images": {"n_samples": 0}, "audio": {"n_samples": 0}}
    if qtype == "Q4_K_M":
        from bench.compare_llamacpp import TOWERS_KEEP

        return json.dumps({
            "version": 1, "name": out.name, "model": str(model), "output": str(out), "seed": 0,
            "calibration": calib, "towers": {**TOWERS_KEEP, "text": text, "per_layer_projections": "int4"},
            "ignore": ["*per_layer_model_projection*"],
            "exports": {"gguf": {"mix": "Q4_K_M", "mmproj": False, "force": force}},
        })
    return json.dumps({
        "version": 1, "name": out.name, "model": str(model), "output": str(out), "seed": 0,
        "calibration": calib,
        "towers": {"text": text, "token_embeddings": "int8_row", "per_layer_embeddings": "int8_row",
                   "per_layer_projections": "keep", "altup_laurel": "keep", "vision": "keep", "audio": "keep",
                   "embedders": "keep"},
        "exports": {"gguf": {"mix": "auto", "mmproj": False, "force": force}},
    })  # JSON is YAML


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def compare_tensor_types(ours: Path, theirs: Path) -> dict:
    """Which tensors the two GGUFs give different GGUF types, and which only one of them has."""
    a, b = tensor_types(ours), tensor_types(theirs)
    both = sorted(a.keys() & b.keys())
    differ = {n: {"ours": a[n], "llama.cpp": b[n]} for n in both if a[n] != b[n]}
    return {"compared": len(both), "same": len(both) - len(differ), "differ": differ,
            "only_ours": sorted(a.keys() - b.keys()), "only_llamacpp": sorted(b.keys() - a.keys())}


def types_summary(c: dict | None) -> str:
    if not c:
        return "-"
    s = f"{c['same']}/{c['compared']} same"
    if c["differ"]:
        pairs: dict[str, int] = {}
        for d in c["differ"].values():
            k = f"{d['ours']} vs {d['llama.cpp']}"
            pairs[k] = pairs.get(k, 0) + 1
        s += "; differ: " + ", ".join(f"{n} x {k}" for k, n in sorted(pairs.items()))
    if c["only_ours"] or c["only_llamacpp"]:
        s += f"; only ours {len(c['only_ours'])}, only llama.cpp {len(c['only_llamacpp'])}"
    return s


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def size_model(size: str, work: Path, n_types: int = 1) -> tuple[Path | None, str | None]:
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
    folder = work / f"synthetic-{size}"
    have = (folder / "model.safetensors.index.json").exists()
    # checkpoint (unless kept from an earlier run) + llama.cpp's F16 (1x) + per type our GGUF and
    # llama.cpp's (~0.35x each; ours are kept until compared)
    disk = (0 if have else need) + need + 0.7 * n_types * need
    if free < disk:
        return None, f"needs about {disk / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free"
    if not have:
        print(f"writing {size} checkpoint ({need / GiB:.1f} GiB bf16) to {folder}", flush=True)
        write_checkpoint(folder, cached_tiny("trained"), layers)
    return folder, None


def llamacpp_quantize_cmd(tools, f16: Path, out: Path, qtype: str, threads: int) -> list:
    if tools.has("llama-quantize"):
        return [tools.exe("llama-quantize"), f16, out, qtype, threads]
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench.llamacpp_tools import "
            "quantize_plain; from pathlib import Path; quantize_plain(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[5], "
            "int(sys.argv[4]))", ROOT, f16, out, threads, qtype]


def run_size(size: str, args, tools, work: Path) -> dict:
    model, why = size_model(size, work, len(args.types))
    if model is None:
        return {"size": size, "skipped": why}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    res: dict = {"size": size, "model": str(model), "checkpoint_bytes": checkpoint_bytes(model), "types": {}}
    cfg = json.loads((model / "config.json").read_text())["text_config"]
    force = cfg["num_hidden_layers"] != 25 and cfg["num_hidden_layers"] != 35
    sw = work / size
    sw.mkdir(parents=True, exist_ok=True)
    ours_need = OURS_PEAK_PER_BYTE * res["checkpoint_bytes"] + 1 * GiB
    if mem_available() < ours_need:
        res["skipped"] = (f"our pipeline is expected to need about {ours_need / GiB:.1f} GiB, "
                          f"{mem_available() / GiB:.1f} GiB available now; not run, so as not to push the machine into the OOM killer")
        return res
    ours_files: dict[str, Path] = {}
    for qt in args.types:
        tr = res["types"][qt] = {}
        steps = [("rtn", "int4")] + ([("gptq", "int4_gptq")] if args.gptq and size == "tiny" and qt == "Q4_0" else [])
        for label, scheme in steps:
            out = sw / f"ours-{qt}-{label}"
            recipe = sw / f"ours-{qt}-{label}.yaml"
            recipe.write_text(recipe_yaml(model, out, scheme, force, qt))
            print(f"[{size} {qt}] ours ({label}) ...", flush=True)
            m = measure([sys.executable, "-m", "quantize", "run", recipe], env, sw / f"ours-{qt}-{label}.log")
            ggufs = sorted(out.glob("*.gguf"))
            m["gguf_bytes"] = sum(f.stat().st_size for f in ggufs)
            tr[f"ours_{label}"] = m
            print(f"[{size} {qt}] ours ({label}): {m['wall_s']:.1f} s, peak {m['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
            if label == "rtn" and ggufs:
                ours_files[qt] = out  # compared with llama.cpp's file of the same type, then deleted
            elif not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    def cleanup():
        if not args.keep:
            for out in ours_files.values():
                shutil.rmtree(out, ignore_errors=True)

    need = CONVERTER_PEAK_PER_BYTE * res["checkpoint_bytes"] + 1 * GiB
    skip = None
    if tools.converter is None:
        skip = "convert_hf_to_gguf.py not found (run bench/build_llamacpp_tools.sh)"
    elif mem_available() < need and not args.no_memory_guard:
        skip = f"llama.cpp's converter needs about {need / GiB:.1f} GiB, {mem_available() / GiB:.1f} GiB available now"
    if skip:
        for tr in res["types"].values():
            tr["llamacpp"] = {"skipped": skip}
        cleanup()
        return res
    f16 = sw / "llamacpp-F16.gguf"
    print(f"[{size}] llama.cpp convert_hf_to_gguf --outtype f16 ...", flush=True)
    try:
        conv = measure([sys.executable, tools.converter, model, "--outtype", "f16", "--outfile", f16],
                       dict(env, PYTHONPATH=f"{tools.gguf_py}"), sw / "llamacpp-convert.log")
    except RuntimeError as e:  # e.g. the OOM killer on a machine that cannot hold it: keep our numbers
        for tr in res["types"].values():
            tr["llamacpp"] = {"skipped": f"convert failed: {str(e).splitlines()[0]}"}
        f16.unlink(missing_ok=True)
        cleanup()
        return res
    print(f"[{size}] llama.cpp convert: {conv['wall_s']:.1f} s, peak {conv['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    for qt in args.types:
        tr = res["types"][qt]
        q = sw / f"llamacpp-{qt}.gguf"
        quant = measure(llamacpp_quantize_cmd(tools, f16, q, qt, args.threads), env, sw / f"llamacpp-quantize-{qt}.log")
        print(f"[{size} {qt}] llama.cpp quantize: {quant['wall_s']:.1f} s, peak {quant['peak_rss_bytes'] / GiB:.2f} GiB",
              flush=True)
        tr["llamacpp"] = {"convert": conv, "quantize": quant,
                          "wall_s": round(conv["wall_s"] + quant["wall_s"], 2),
                          "peak_rss_bytes": max(conv["peak_rss_bytes"], quant["peak_rss_bytes"]),
                          "f16_bytes": f16.stat().st_size, "gguf_bytes": q.stat().st_size}
        r = tr["ours_rtn"]
        tr["ratio_rtn"] = {"wall": r["wall_s"] / tr["llamacpp"]["wall_s"],
                           "peak_rss": r["peak_rss_bytes"] / tr["llamacpp"]["peak_rss_bytes"]}
        if qt in ours_files:
            tr["tensor_types"] = compare_tensor_types(sorted(ours_files[qt].glob("*.gguf"))[0], q)
            print(f"[{size} {qt}] tensor types: {types_summary(tr['tensor_types'])}", flush=True)
        if not args.keep:
            q.unlink(missing_ok=True)
    if not args.keep:
        f16.unlink(missing_ok=True)
    cleanup()
    return res


def verdict(qt: str, ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    wall, rss = TARGETS[qt]
    missed = [x for x, ok in (("wall", ratio["wall"] <= wall), ("RSS", ratio["peak_rss"] <= rss)) if not ok]
    return "met" if not missed else "WORSE: " + ", ".join(missed) + " missed"


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| size | type | checkpoint GiB | ours RTN s | ours RTN peak GiB | ours GPTQ s | ours GPTQ peak GiB | "
             "llama.cpp convert+quantize s | llama.cpp peak GiB | wall ratio | RSS ratio | target | result | "
             "tensor types vs llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['size']} | - | skipped: {r['skipped']} ||||||||||||")
            continue
        for qt, tr in r["types"].items():
            o, g, l = tr.get("ours_rtn", {}), tr.get("ours_gptq"), tr.get("llamacpp", {})
            ratio = tr.get("ratio_rtn")
            lines.append("| {} | {} | {:.2f} | {:.1f} | {:.2f} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["size"], qt, r["checkpoint_bytes"] / GiB, o["wall_s"], o["peak_rss_bytes"] / GiB,
                f"{g['wall_s']:.1f}" if g else "-", f"{g['peak_rss_bytes'] / GiB:.2f}" if g else "-",
                f"{l['wall_s']:.1f}" if "wall_s" in l else l.get("skipped", "-"),
                f"{l['peak_rss_bytes'] / GiB:.2f}" if "peak_rss_bytes" in l else "-",
                f"{ratio['wall']:.3f}" if ratio else "-", f"{ratio['peak_rss']:.3f}" if ratio else "-",
                "<= {}x wall, <= {}x RSS".format(*TARGETS[qt]), verdict(qt, ratio),
                types_summary(tr.get("tensor_types"))))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench.results_file import machine, write_results

    args = parse_args(argv)
    from bench.llamacpp_tools import find_tools

    tools = find_tools(args.tools)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        results.append(run_size(size, args, tools, work))
        if not (args.keep or args.keep_checkpoint) and size != "tiny":
            shutil.rmtree(work / f"synthetic-{size}", ignore_errors=True)
    cmd = "python bench/conversion_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Conversion cost, ours vs llama.cpp\n\n`{cmd.strip()}`, {args.threads} threads, {os.cpu_count()} cores ({machine()}), "
              f"{Path('/proc/meminfo').read_text().split()[1]} kB RAM, load average {os.getloadavg()[0]:.1f} at the end, "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}. Ours: safetensors -> text GGUF of the type in one "
              "process, RTN (Q4_0: int4 g32, Q4_0 blocks bit for bit; Q4_K_M: the export's `mix: Q4_K_M`, encoded from "
              "the float weights). llama.cpp: convert_hf_to_gguf.py --outtype f16 (once per size), then llama-quantize "
              "TYPE; its wall time is the sum, its peak the larger of the two. Tensor types: of the tensors both GGUFs "
              "have, how many have the same GGUF type (the differing ones are listed in the json).")
    md = markdown(results, header)
    out = Path(args.out)
    write_results(out, "conversion_cost" + (f"-{args.tag}" if args.tag else ""), {"command": cmd.strip(), "threads": args.threads, "types": args.types,
                                           "results": results}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
