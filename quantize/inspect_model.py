"""``python -m quantize inspect``: towers with parameter counts and bytes, KV-sharing groups and
the dead k/v tensors a checkpoint carries. Reads only safetensors headers."""
from __future__ import annotations

from quantize.model import Checkpoint, tower_of

# Finer rows than the quantization towers, for people reading the output.
_PARTS = (
    ("text decoder layers", lambda n, t: t == "text"),
    ("token embeddings", lambda n, t: t == "token_embeddings"),
    ("per-layer embeddings", lambda n, t: t == "per_layer_embeddings"),
    ("per-layer projections", lambda n, t: t == "per_layer_projections"),
    ("AltUp", lambda n, t: t == "altup_laurel" and "altup" in n),
    ("LAuReL", lambda n, t: t == "altup_laurel" and "laurel" in n),
    ("vision tower (MobileNetV5)", lambda n, t: t == "vision"),
    ("audio tower (Conformer)", lambda n, t: t == "audio"),
    ("multimodal embedders", lambda n, t: t == "embedders"),
    ("norms and other 1-D", lambda n, t: t == "norms"),
)


def describe(ckpt: Checkpoint) -> dict:
    parts = {label: {"tensors": 0, "params": 0, "bytes": 0} for label, _ in _PARTS}
    for info in ckpt.tensors.values():
        tower = tower_of(info.name, len(info.shape))
        for label, pred in _PARTS:
            if pred(info.name, tower):
                row = parts[label]
                row["tensors"] += 1
                row["params"] += info.numel
                row["bytes"] += info.nbytes
                break
    tc = ckpt.text_config
    dead = ckpt.dead_kv()
    return {
        "folder": str(ckpt.folder),
        "text": {
            k: tc.get(k)
            for k in (
                "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                "vocab_size_per_layer_input", "hidden_size_per_layer_input", "num_kv_shared_layers",
                "altup_num_inputs", "laurel_rank", "sliding_window",
            )
        },
        "parts": parts,
        "total": {k: sum(p[k] for p in parts.values()) for k in ("tensors", "params", "bytes")},
        "kv_groups": [
            {"attention_type": g.attention_type, "producer": g.producer, "consumers": list(g.consumers)}
            for g in ckpt.kv_groups
        ],
        "dead_kv": dead,
    }


def format_description(d: dict) -> str:
    lines = [f"model: {d['folder']}"]
    text = {k: (v[0] if isinstance(v, list) and len(set(v)) == 1 else v) for k, v in d["text"].items()}
    lines.append("text config: " + ", ".join(f"{k}={v}" for k, v in text.items()))
    lines.append("")
    lines.append(f"{'part':<28} {'tensors':>8} {'params':>15} {'bytes':>16}")
    for label, row in d["parts"].items():
        if row["tensors"]:
            lines.append(f"{label:<28} {row['tensors']:>8} {row['params']:>15,} {row['bytes']:>16,}")
    t = d["total"]
    lines.append(f"{'total':<28} {t['tensors']:>8} {t['params']:>15,} {t['bytes']:>16,}")
    lines.append("")
    lines.append("KV-sharing groups (producer -> consumers):")
    for g in d["kv_groups"]:
        kind = "sliding" if g["attention_type"].startswith("sliding") else "full"
        lines.append(f"  {kind:<8} layer {g['producer']} -> layers {', '.join(map(str, g['consumers']))}")
    if d["dead_kv"]:
        lines.append(f"dead k/v tensors present ({len(d['dead_kv'])}; consumers never read them):")
        lines.extend(f"  {n}" for n in d["dead_kv"])
    else:
        lines.append("dead k/v tensors present: none (saved by transformers >= 5, or no KV sharing)")
    return "\n".join(lines)
