"""What format writers read: the plan plus each tensor's final form, produced one at a time.

``TensorSource.get(name)`` returns a ``QuantizedTensor`` for a planned quantized tensor (from the
sequential calibration when it ran, else quantized now with RTN / importance RTN) or the float
tensor of the computed model for everything kept, including dead k/v. ``float_weight(name)`` is
the one answer to "the float weight of the model the quantizer saw": the checkpoint's tensor
with what the calibration changed applied (AWQ divides ``pre_feedforward_layernorm`` by its
scales and multiplies gate/up/down by them, quantized or kept). Writers that encode floats
(GGUF types named by a mix or ``tensor_types``, kept tensors) read it, never the checkpoint,
so every export computes the same model. Nothing is cached: a writer that asks for one tensor
at a time keeps peak memory near the largest tensor, and ``rows`` / ``float_rows`` give row
ranges of tensors that can be produced row by row (RTN quantizes each row alone), so a writer
can stream a 5 GB embedding table in small pieces.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from quantize.model import TORCH_DTYPE_NAMES, Checkpoint
from quantize.plan import Plan
from quantize.qtensor import QuantizedTensor


@dataclass(frozen=True)
class Rescale:
    """How AWQ changed a linear's float weight: ``W * cols[None, :]`` (an absorbed scale on its
    input), then ``/ rows[:, None]`` (its output feeds a scaled consumer). Kept as vectors, not
    weights: a copy of every rescaled MLP weight of E4B would be gigabytes. The order and dtype
    (fp32) are the sequential engine's, so ``apply`` reproduces its weights bit for bit."""

    cols: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def apply(self, w: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """fp32 rescaled rows ``start:stop`` (``w`` holds exactly those rows)."""
        w = w.to(torch.float32)
        if self.cols is not None:
            w = w * self.cols.to(torch.float32).unsqueeze(0)
        if self.rows is not None:
            w = w / self.rows.to(torch.float32)[start:stop].unsqueeze(1)
        return w


def computed_method(entry) -> str:
    """The method that really produces ``entry``'s values: ``keep``, ``rtn``, ``gptq`` or
    ``awq``. Only text-decoder linears go through the sequential calibration (the plan refuses
    GPTQ/AWQ elsewhere), and AWQ reaches only the MLP linears there
    (``quantize.sequential.AWQ_LINEARS``): attention asked for AWQ is rounded to nearest."""
    from quantize.sequential import AWQ_LINEARS

    if not entry.quantized:
        return "keep"
    m = entry.scheme.method
    if m == "awq" and not entry.name.endswith(tuple(f".{p}.weight" for p in AWQ_LINEARS)):
        return "rtn"
    return m


@dataclass
class TensorSource:
    checkpoint: Checkpoint
    plan: Plan
    # Results computed ahead (sequential GPTQ/AWQ on the text decoder), by tensor name.
    precomputed: Mapping[str, QuantizedTensor] = field(default_factory=dict)
    # Float tensors the calibration replaced (AWQ's rescaled norms), by tensor name.
    updated: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # Linears whose float weights the calibration rescaled (AWQ), by tensor name.
    rescaled: Mapping[str, Rescale] = field(default_factory=dict)
    # Per-input-column activation statistics (mean x^2) for importance RTN, by tensor name.
    importance: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # fp8 KV-cache scales of every decoder layer: {layer: (k_scale, v_scale)}; a KV consumer has its producer's.
    kv_scales: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def changed(self, name: str) -> bool:
        """Whether the calibration changed this tensor's float weight."""
        return name in self.updated or name in self.rescaled

    def float_weight(self, name: str) -> torch.Tensor:
        """The float weight of the computed model before quantization: the checkpoint's, with
        the calibration's changes applied (fp32 where changed, else the checkpoint's dtype)."""
        if name in self.updated:
            return self.updated[name]
        w = self.checkpoint.get(name)
        r = self.rescaled.get(name)
        return w if r is None else r.apply(w)

    def float_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``float_weight(name)``, read from the file alone."""
        if name in self.updated:
            return self.updated[name][start:stop]
        w = self.checkpoint.read_rows(name, start, stop)
        r = self.rescaled.get(name)
        return w if r is None else r.apply(w, start, stop)

    def get(self, name: str) -> QuantizedTensor | torch.Tensor:
        entry = self.plan[name]
        if not entry.quantized:
            w = self.float_weight(name)
            # kept tensors stay in their own dtype (the safetensors layout and its sizes say so)
            if not self.changed(name) or entry.dtype not in TORCH_DTYPE_NAMES:
                return w
            return w.to(getattr(torch, TORCH_DTYPE_NAMES[entry.dtype]))
        if name in self.precomputed:
            return self.precomputed[name]
        from quantize.methods.dispatch import quantize_tensor

        return quantize_tensor(name, self.float_weight(name), entry.scheme, self.importance.get(name))

    def row_streamable(self, name: str) -> bool:
        """Whether ``rows`` gives exactly the rows of ``get`` (nothing computed ahead or changed
        for this tensor, and no scale that spans rows: per-tensor fp8 needs the whole tensor)."""
        if name in self.precomputed or self.changed(name):
            return False
        entry = self.plan[name]
        return not (entry.quantized and entry.scheme.strategy == "tensor")

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
        """fp32 tensor as the quantized model computes it (the float weight for kept tensors)."""
        t = self.get(name)
        return t.dequantize() if isinstance(t, QuantizedTensor) else t.to(torch.float32)
