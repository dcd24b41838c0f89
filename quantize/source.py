"""What format writers read: the plan plus each tensor's final form, produced one at a time.

``TensorSource.get(name)`` returns a ``QuantizedTensor`` for a planned quantized tensor (from the
sequential calibration when it ran, else quantized now with RTN / importance RTN) or the
checkpoint's own tensor (fp32 or bf16...) for everything kept, including dead k/v. Nothing is
cached: a writer that asks for one tensor at a time keeps peak memory near the largest tensor,
and ``rows`` / ``original_rows`` give row ranges of tensors that can be produced row by row (RTN
quantizes each row alone), so a writer can stream a 5 GB embedding table in small pieces.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from quantize.model import Checkpoint
from quantize.plan import Plan
from quantize.qtensor import QuantizedTensor


@dataclass
class TensorSource:
    checkpoint: Checkpoint
    plan: Plan
    # Results computed ahead (sequential GPTQ/AWQ on the text decoder), by tensor name.
    precomputed: Mapping[str, QuantizedTensor] = field(default_factory=dict)
    # Float tensors the calibration changed without quantizing (AWQ folds scales into norms).
    updated: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # Per-input-column activation statistics (mean x^2) for importance RTN, by tensor name.
    importance: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # fp8 KV-cache scales per KV group producer layer: {producer: (k_scale, v_scale)}.
    kv_scales: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def original(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def get(self, name: str) -> QuantizedTensor | torch.Tensor:
        entry = self.plan[name]
        if not entry.quantized:
            return self.updated[name] if name in self.updated else self.checkpoint.get(name)
        if name in self.precomputed:
            return self.precomputed[name]
        from quantize.methods.dispatch import quantize_tensor

        return quantize_tensor(name, self.checkpoint.get(name), entry.scheme, self.importance.get(name))

    def row_streamable(self, name: str) -> bool:
        """Whether ``rows`` gives exactly the rows of ``get`` (nothing computed ahead for this
        tensor, and no scale that spans rows: per-tensor fp8 needs the whole tensor)."""
        if name in self.precomputed or name in self.updated:
            return False
        entry = self.plan[name]
        return not (entry.quantized and entry.scheme.strategy == "tensor")

    def original_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read_rows(name, start, stop)

    def rows(self, name: str, start: int, stop: int) -> QuantizedTensor | torch.Tensor:
        """Rows ``start:stop`` of ``get(name)``; only for ``row_streamable`` tensors."""
        if not self.row_streamable(name):
            raise ValueError(f"{name}: computed as a whole tensor; use get()")
        entry = self.plan[name]
        chunk = self.checkpoint.read_rows(name, start, stop)
        if not entry.quantized:
            return chunk
        from quantize.methods.dispatch import quantize_tensor

        return quantize_tensor(name, chunk, entry.scheme, self.importance.get(name))

    def dequantized(self, name: str) -> torch.Tensor:
        """fp32 tensor as the quantized model computes it (original for kept tensors)."""
        t = self.get(name)
        return t.dequantize() if isinstance(t, QuantizedTensor) else t.to(torch.float32)
