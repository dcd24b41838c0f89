"""The one hand-off type between algorithms and format writers.

Algorithms (``quantize.methods``) return a ``QuantizedTensor``; writers (``quantize.formats``)
pack it. Nothing else packs bits.

Layout (rows = shape[0], cols = product of the remaining dims, i.e. the weight flattened to 2-D
as ``W.reshape(rows, -1)``; for a Linear that is (out_features, in_features), for a conv
(out_channels, in/groups * kh * kw), for an embedding (tokens, width)):

- ``codes``
  - int4 / int8, symmetric: ``torch.int8`` (rows, cols), values in [-8, 7] / [-127, 127] (see ``rtn.symmetric_range``);
  - int4 / int8, asymmetric: ``torch.uint8`` (rows, cols), values in [0, 15] / [0, 255];
  - fp8: ``torch.float8_e4m3fn`` (rows, cols).
- ``scales``: (rows, n_groups) with n_groups = cols // group_size for strategy ``group``, 1 for
  ``channel``; (1, 1) for ``tensor``. ``torch.float16`` for int4/int8 so that GGUF's Q4_0 /
  Q8_0 blocks (fp16 ``d``) and compressed-tensors hold them exactly; ``torch.float32`` for fp8.
- ``zero_points``: None when symmetric, else ``torch.uint8`` (rows, n_groups).

Dequantization: ``W[r, g*G:(g+1)*G] = (codes - zero_point[r, g]) * scales[r, g]`` in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantize.schemes import QuantScheme


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    name: str
    shape: tuple[int, ...]
    scheme: QuantScheme
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None = None
    # Free-form facts an algorithm wants recorded (e.g. "gptq_fallback": "hessian not PD").
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = self.shape[0]
        cols = int(torch.tensor(self.shape[1:]).prod().item()) if len(self.shape) > 1 else 1
        if tuple(self.codes.shape) != (rows, cols):
            raise ValueError(f"{self.name}: codes shape {tuple(self.codes.shape)} != ({rows}, {cols})")
        s = self.scheme
        if s.type == "fp8":
            if self.codes.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{self.name}: fp8 codes must be float8_e4m3fn, got {self.codes.dtype}")
        elif s.type in ("int4", "int8"):
            want = torch.int8 if s.symmetric else torch.uint8
            if self.codes.dtype != want:
                raise ValueError(f"{self.name}: {s.label()} codes must be {want}, got {self.codes.dtype}")
            if self.scales.dtype != torch.float16:
                raise ValueError(f"{self.name}: int scales must be float16, got {self.scales.dtype}")
            if s.symmetric != (self.zero_points is None):
                raise ValueError(f"{self.name}: zero_points must be given exactly when asymmetric")
        else:
            raise ValueError(f"{self.name}: scheme 'keep' has no QuantizedTensor")
        if self.scales.shape[0] not in (1, rows) or self.scales.dim() != 2:
            raise ValueError(f"{self.name}: scales shape {tuple(self.scales.shape)} does not fit rows={rows}")
        if cols % self.scales.shape[1]:
            raise ValueError(f"{self.name}: {cols} columns do not split into {self.scales.shape[1]} groups")

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]

    @property
    def group_size(self) -> int:
        """Columns per scale (equals ``cols`` for per-channel and per-tensor)."""
        return self.cols // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """fp32 weights in the original shape."""
        g = self.group_size
        q = self.codes.to(torch.float32).reshape(self.rows, -1, g)
        if self.zero_points is not None:
            q = q - self.zero_points.to(torch.float32).unsqueeze(-1)
        w = q * self.scales.to(torch.float32).unsqueeze(-1)
        if self.scales.shape[0] == 1 and self.rows != 1:
            w = q * self.scales.to(torch.float32).reshape(1, -1, 1)
        return w.reshape(self.shape)

    def nbytes(self) -> int:
        """Bytes of codes at their nominal bit width, plus scales and zero points."""
        bits = self.scheme.bits or 8
        n = self.codes.numel() * bits // 8
        n += self.scales.numel() * self.scales.element_size()
        if self.zero_points is not None:
            n += self.zero_points.numel()
        return n
