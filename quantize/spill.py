"""Finished layers' quantized tensors kept on disk until the writers read them.

The sequential engine finishes one decoder layer at a time, but the format writers run only
after the last one. Held in RAM, E4B's finished codes grow by ~110 M int8 codes per layer (one
byte per 4-bit code, see ``quantize.qtensor``): 3.6 GiB at layer 35, on top of the layer being
calibrated. ``SpilledTensors`` writes each finished layer's tensors to one safetensors file in a
folder the caller owns (the run's partial output folder, so a failed run leaves nothing) and
reads a tensor back only when a writer asks for it: peak memory stays one layer's state.

It is a ``Mapping[str, QuantizedTensor]``, what ``quantize.source.TensorSource.precomputed``
takes: a lookup returns a fresh ``QuantizedTensor`` equal, tensor for tensor and bit for bit, to
the one stored (safetensors stores int8, uint8, float16, float32 and float8_e4m3fn as they are);
the scheme and ``info`` stay in memory (a few hundred bytes per tensor).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme


@dataclass(frozen=True)
class _Stored:
    file: Path
    shape: tuple[int, ...]
    scheme: QuantScheme
    info: dict
    has_zero_points: bool


class SpilledTensors(Mapping[str, QuantizedTensor]):
    """``folder`` must exist and belong to the caller, who removes it when the writers are done."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._stored: dict[str, _Stored] = {}
        self._files = 0

    def add(self, tensors: Mapping[str, QuantizedTensor]) -> None:
        """Write ``tensors`` (e.g. one finished layer's) to one new file; they no longer need to
        be held in memory by the caller."""
        if not tensors:
            return
        clash = sorted(set(tensors) & set(self._stored))
        if clash:
            raise ValueError(f"{clash[0]}: already spilled")
        path = self.folder / f"part-{self._files:05d}.safetensors"
        self._files += 1
        payload = {}
        for name, qt in tensors.items():
            payload[f"{name}:codes"] = qt.codes.detach().cpu().contiguous()
            payload[f"{name}:scales"] = qt.scales.detach().cpu().contiguous()
            if qt.zero_points is not None:
                payload[f"{name}:zero_points"] = qt.zero_points.detach().cpu().contiguous()
        save_file(payload, str(path))
        for name, qt in tensors.items():
            self._stored[name] = _Stored(path, tuple(qt.shape), qt.scheme, dict(qt.info), qt.zero_points is not None)

    def __getitem__(self, name: str) -> QuantizedTensor:
        s = self._stored[name]
        with safe_open(str(s.file), framework="pt") as f:
            codes = f.get_tensor(f"{name}:codes")
            scales = f.get_tensor(f"{name}:scales")
            zero_points = f.get_tensor(f"{name}:zero_points") if s.has_zero_points else None
        return QuantizedTensor(name=name, shape=s.shape, scheme=s.scheme, codes=codes, scales=scales,
                               zero_points=zero_points, info=dict(s.info))

    def __contains__(self, name: object) -> bool:
        return name in self._stored

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)
