"""Peak memory of sequential calibration (quantize.sequential.quantize_text_decoder) as layers grow.

For each depth, a child process loads a tiny Gemma 3n (the trained one at its own 25 layers;
seeded random ones with the same widths and more layers), measures its resident memory right
before calibration, samples RSS every 5 ms during ``quantize_text_decoder`` and prints:
the peak increase over that baseline (what calibration itself costs), that increase per layer,
the bytes of one decoder layer's weights and of one layer's activations for all batches. If
calibration kept every layer's activations alive, the increase would grow linearly with depth;
the engine keeps one layer's worth (plus the KV producers' caches), so it should stay flat
except for one known term: every layer's per-layer-input slice (batches * tokens * 256 * 4
bytes per layer, 0.5 MiB per layer at 4 x 128 tokens) is captured up front.
With ``--device cuda`` it also reports ``torch.cuda.max_memory_allocated``.

    python bench/calibration_memory.py                      # trained 25 layers + random 35, 50
    python bench/calibration_memory.py --layers 25 40 --batches 4 --tokens 256 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self, period: float = 0.005):
        self.period = period
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def build_model(flavour: str, layers: int):
    import torch
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    from quantize.tiny import cached_tiny

    folder = cached_tiny(flavour)
    if flavour == "trained" and layers == 25:
        model = Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, use_kernels=False).eval()
        # from_pretrained may leave weights backed by the memory-mapped file, paged in only when
        # first touched; make them resident now so the baseline holds the whole model, as it
        # does for the randomly initialised deeper models.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        return model, folder
    cfg = Gemma3nConfig.from_pretrained(folder)
    t = cfg.text_config.to_dict()
    # Same structure rules as the tiny builder: every 5th layer full attention, the last 5 layers
    # reuse KV, sparsity on the first 10.
    t.update(
        num_hidden_layers=layers,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
        intermediate_size=[t["intermediate_size"][0]] * layers if isinstance(t["intermediate_size"], list) else t["intermediate_size"],
    )
    t.pop("kv_sharing_modes", None)
    cfg_dict = cfg.to_dict()
    cfg_dict["text_config"] = t
    cfg = Gemma3nConfig.from_dict(cfg_dict)
    torch.manual_seed(0)
    return Gemma3nForConditionalGeneration(cfg).eval(), folder


def child(args) -> dict:
    import torch

    from quantize.schemes import resolve_scheme
    from quantize.sequential import LINEARS, quantize_text_decoder, text_linear_name

    torch.set_num_threads(args.threads)
    n_layers = args.layers[0]
    model, _ = build_model(args.flavour, n_layers)
    lm = model.model.language_model
    scheme = resolve_scheme(args.scheme)
    schemes = {}
    for i, layer in enumerate(lm.layers):
        for m in LINEARS:
            try:
                layer.get_submodule(m)
            except AttributeError:
                continue
            schemes[text_linear_name(i, m)] = scheme
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 4000, (1, args.tokens), generator=g),
                "attention_mask": torch.ones(1, args.tokens, dtype=torch.long)} for _ in range(args.batches)]
    layer_bytes = sum(p.numel() * p.element_size() for p in lm.layers[0].parameters())
    d = lm.config.hidden_size
    act_bytes = args.batches * args.tokens * (lm.config.altup_num_inputs * d * 4)  # one layer's hidden states
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = rss_bytes()
    t0 = time.perf_counter()
    with PeakSampler() as s:
        res = quantize_text_decoder(model, schemes, batches, device=args.device, kv_fp8=True, progress=False)
    out = {
        "flavour": args.flavour, "layers": n_layers, "device": args.device, "scheme": scheme.label(),
        "batches": args.batches, "tokens": args.tokens, "seconds": round(time.perf_counter() - t0, 1),
        "baseline_rss": base, "peak_rss": s.peak, "calibration_peak_bytes": s.peak - base,
        "calibration_bytes_per_layer": (s.peak - base) // n_layers,
        "one_layer_weight_bytes": layer_bytes, "one_layer_activation_bytes": act_bytes,
        "quantized_tensors": len(res.tensors),
        # The returned codes/scales live in RAM too (int8 per code) and grow with depth by design.
        "result_bytes": sum(q.codes.numel() * q.codes.element_size() + q.scales.numel() * q.scales.element_size()
                            + (q.zero_points.numel() if q.zero_points is not None else 0) for q in res.tensors.values()),
        "mean_layer_rel_error": sum(r["rel_error"] for r in res.report.values()) / len(res.report),
    }
    if cuda:
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[25, 35, 50])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--scheme", default="int4_gptq")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--base", default="trained", choices=("trained", "random"), help="model at 25 layers (deeper ones are random)")
    ap.add_argument("--flavour", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for n in args.layers:
        flavour = args.base if n == 25 else "random"
        cmd = [sys.executable, __file__, "--child", "--flavour", flavour, "--layers", str(n), "--device", args.device,
               "--batches", str(args.batches), "--tokens", str(args.tokens), "--scheme", args.scheme, "--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        mib = 1 / 2 ** 20
        line = (f"{row['flavour']:>7} layers={row['layers']:>3} {row['seconds']:>6}s  baseline RSS {row['baseline_rss'] * mib:7.1f} MiB  "
                f"calibration peak +{row['calibration_peak_bytes'] * mib:6.1f} MiB = {row['calibration_bytes_per_layer']:>9,} B/layer  "
                f"(one layer: weights {row['one_layer_weight_bytes']:,} B, activations {row['one_layer_activation_bytes']:,} B)")
        if "cuda_max_allocated" in row:
            line += f"  cuda peak {row['cuda_max_allocated'] * mib:.1f} MiB"
        line += f"  returned tensors {row['result_bytes'] * mib:.1f} MiB"
        print(line, flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        work = lambda r: r["calibration_peak_bytes"] - r["result_bytes"]  # noqa: E731
        print(f"working memory (peak increase minus the returned tensors): {work(a):,} B at {a['layers']} layers, "
              f"{work(b):,} B at {b['layers']} layers; growth {(work(b) - work(a)) / (b['layers'] - a['layers']):,.0f} B per added layer")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
