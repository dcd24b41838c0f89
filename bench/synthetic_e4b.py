"""A Gemma 3n checkpoint with E4B's real text widths and random bf16 weights, for conversion costs.

The tensor names and shapes come from transformers' own ``Gemma3nTextModel`` built on the meta
device (nothing allocated), plus the dead k/v projections of the KV-shared layers that Google's
checkpoints carry. Weights are drawn and written one shard at a time (``--shard-gb``), so making
an 8B-parameter checkpoint needs about one shard of memory. Only the text decoder is written
(the conversion benchmarks are text-only); config, tokenizer and processor files come from the
tiny trained model, whose tokenizer is shorter than the 262400-id vocabulary (both converters pad).

    python bench/synthetic_e4b.py OUT [--layers 35] [--width-div 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# google/gemma-3n-E4B-it text_config (the widths that matter for cost)
E4B_TEXT = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=35, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, vocab_size=262400, vocab_size_per_layer_input=262144,
                hidden_size_per_layer_input=256, num_kv_shared_layers=15, laurel_rank=64, altup_num_inputs=4,
                sliding_window=512)


def text_config(layers: int = 35, width_div: int = 1) -> dict:
    t = dict(E4B_TEXT)
    t["num_hidden_layers"] = layers
    t["num_kv_shared_layers"] = round(15 * layers / 35)
    t["layer_types"] = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)]
    t["activation_sparsity_pattern"] = [0.95] * min(10, layers) + [0.0] * max(0, layers - 10)
    if width_div > 1:  # quick checks of the benchmark itself, not a real size
        for k in ("hidden_size", "intermediate_size", "vocab_size_per_layer_input"):
            t[k] //= width_div
        t["vocab_size"] = t["vocab_size_per_layer_input"] + 256
    return t


def tensor_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import Gemma3nTextConfig, Gemma3nTextModel

    cfg = Gemma3nTextConfig(**text)
    with torch.device("meta"):
        m = Gemma3nTextModel(cfg)
    shapes = {f"model.language_model.{k}": tuple(v.shape) for k, v in m.state_dict().items()}
    first_shared = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    for i in range(first_shared, text["num_hidden_layers"]):  # dead k/v, as in Google's files
        for leaf in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight"):
            shapes[f"model.language_model.layers.{i}.{leaf}"] = shapes[f"model.language_model.layers.0.{leaf}"]
    return shapes


def n_params(text: dict) -> int:
    import math

    return sum(math.prod(s) for s in tensor_shapes(text).values())


def write_checkpoint(out: Path, template: Path, layers: int = 35, width_div: int = 1, shard_gb: float = 2.0,
                     seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    text = text_config(layers, width_div)
    cfg = json.loads((template / "config.json").read_text())
    cfg["text_config"].update(text)
    cfg["torch_dtype"] = "bfloat16"
    cfg["text_config"]["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in template.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    shapes = tensor_shapes(text)
    g = torch.Generator().manual_seed(seed)
    limit = int(shard_gb * 2**30)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:  # norms and scales: ones keep the (never run) model well defined
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({len(names)} tensors)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=35)
    p.add_argument("--width-div", type=int, default=1)
    p.add_argument("--shard-gb", type=float, default=2.0)
    a = p.parse_args(argv)
    from quantize.tiny import cached_tiny

    write_checkpoint(Path(a.out), cached_tiny("trained"), a.layers, a.width_div, a.shard_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
