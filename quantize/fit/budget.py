"""Budgets for ``fit``: a size (``3.5GB``, ``3500MiB``, ``123456`` bytes), bits per weight
(``4.5bpw``) or a device profile plus context, turned into bytes for the text GGUF file.

Device budget = usable memory - KV cache - mmproj (with vision) - llama.cpp compute buffers:

- KV cache (f16, llama.cpp's default cache type): only the first ``num_hidden_layers -
  num_kv_shared_layers`` layers store K and V (the rest read them); a sliding layer holds at most
  ``sliding_window`` tokens, a full-attention layer the whole context. Per layer and token:
  2 (K, V) x num_key_value_heads x head_dim x 2 bytes.
- compute buffers: an estimate, not a measurement: llama.cpp sizes them for the worst ubatch
  (512 tokens): float32 logits over the vocabulary plus the widest activations of one layer
  (3 x intermediate for gate/up/act, 8 x hidden for AltUp's 4 streams and attention, the
  per-layer inputs of every layer): ``4 x 512 x (vocab + 3 x intermediate + 8 x hidden +
  layers x per_layer_dim)`` bytes.
- mmproj: its planned bytes (the vision tower as the writer would write it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from quantize.errors import RecipeError
from quantize.fit.devices import Device

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
UBATCH = 512
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """What the user asked: ``bytes`` or ``bpw`` (exactly one is set)."""

    bytes: int | None = None
    bpw: float | None = None

    def describe(self) -> str:
        return f"{self.bpw:g} bits per weight" if self.bpw is not None else f"{self.bytes:,} bytes"


def parse_budget(text: str | int | float, where: str = "--budget") -> Budget:
    """``3.5GB`` / ``3500MiB`` / ``1234567`` (bytes) or ``4.5bpw``; anything else is one line."""
    s = str(text).strip()
    valid = "valid: bytes like 3.5GB, 3500MiB, 1234567, or bits per weight like 4.5bpw"
    if s.lower().endswith("bpw"):
        try:
            bpw = float(s[:-3])
        except ValueError:
            raise RecipeError(f"{where}: {text!r} is not a budget; {valid}") from None
        if not 1.0 <= bpw <= 32.0:
            raise RecipeError(f"{where}: {bpw:g} bits per weight is outside 1..32; {valid}")
        return Budget(bpw=bpw)
    m = _SIZE.match(s)
    if not m or m.group(2).upper() not in UNITS:
        raise RecipeError(f"{where}: {text!r} is not a budget; {valid} (units: {', '.join(u for u in UNITS if u)})")
    n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if n <= 0:
        raise RecipeError(f"{where}: {text!r} is not a positive size; {valid}")
    return Budget(bytes=n)


def kv_cache_bytes(tc: dict, context: int) -> dict:
    """f16 K and V of the layers that store them, at ``context`` tokens; per attention type."""
    n = int(tc["num_hidden_layers"])
    storing = n - int(tc.get("num_kv_shared_layers") or 0)
    types = tc.get("layer_types") or ["full_attention"] * n
    per_token = 2 * int(tc["num_key_value_heads"]) * int(tc["head_dim"]) * 2
    window = int(tc.get("sliding_window") or context)
    sliding = sum(1 for t in types[:storing] if t == "sliding_attention")
    full = storing - sliding
    return {"layers_storing_kv": storing, "sliding_layers": sliding, "full_layers": full,
            "sliding_tokens": min(context, window), "bytes_per_layer_token": per_token,
            "bytes": per_token * (sliding * min(context, window) + full * context)}


def compute_buffer_bytes(tc: dict) -> int:
    inter = tc["intermediate_size"]
    inter = max(inter) if isinstance(inter, list) else int(inter)
    width = (int(tc["vocab_size"]) + 3 * inter + 8 * int(tc["hidden_size"])
             + int(tc["num_hidden_layers"]) * int(tc.get("hidden_size_per_layer_input") or 0))
    return 4 * UBATCH * width


@dataclass(frozen=True)
class Breakdown:
    device: Device
    context: int
    vision: bool
    kv: dict
    compute: int
    mmproj: int

    @property
    def weights(self) -> int:
        return self.device.usable - self.kv["bytes"] - self.compute - self.mmproj

    def lines(self) -> list[str]:
        d, kv = self.device, self.kv
        mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        return [
            f"device {d.name}: {d.title}",
            f"  memory            {mib(d.total):>14}  ({d.source})",
            f"  - reserve         {mib(d.reserve):>14}  ({d.reserve_note})",
            f"  = usable          {mib(d.usable):>14}",
            f"  - KV cache (f16)  {mib(kv['bytes']):>14}  ({kv['layers_storing_kv']} layers store K/V: {kv['full_layers']} full x "
            f"{self.context} tokens + {kv['sliding_layers']} sliding x {kv['sliding_tokens']} tokens, "
            f"{kv['bytes_per_layer_token']} bytes per layer and token: {kv['bytes']:,} bytes)",
            f"  - mmproj          {mib(self.mmproj):>14}  ({'vision on: the planned mmproj file' if self.vision else 'vision off'})",
            f"  - compute buffers {mib(self.compute):>14}  (estimate: 4 B x {UBATCH}-token ubatch x (vocab + 3 x intermediate + 8 x hidden + layers x per-layer dim))",
            f"  = text GGUF       {mib(self.weights):>14}  ({self.weights:,} bytes)",
        ]
