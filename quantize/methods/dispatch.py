"""One entry point for tensors quantized without a calibration pass (towers, embeddings).

Text-decoder linears with GPTQ/AWQ are quantized by ``quantize.sequential``; everything else
comes here. RTN, or importance-weighted RTN when the scheme asks and statistics exist.
"""
from __future__ import annotations

import torch

from quantize.methods import rtn
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme


def quantize_tensor(name: str, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> QuantizedTensor:
    if importance is not None and scheme.importance:
        return rtn.quantize_rtn(name, weight, scheme, importance=importance)
    return rtn.quantize_rtn(name, weight, scheme)
