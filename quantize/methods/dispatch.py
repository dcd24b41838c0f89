"""One entry point for tensors quantized without a calibration pass (towers, embeddings).

Text-decoder linears with GPTQ/AWQ are quantized by ``quantize.sequential``; everything else
comes here. RTN, or importance-weighted RTN when the scheme asks for it. A scheme that asks for
importance where no activation statistics exist (embedding tables: their "input" is a one-hot
token) gets uniform weights, i.e. the scale search minimises plain squared error; plain RTN is
one of its candidates, so the result is never worse than RTN in that error.
"""
from __future__ import annotations

import torch

from quantize.methods import rtn
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme


def quantize_tensor(name: str, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> QuantizedTensor:
    if scheme.importance and scheme.type in ("int4", "int8"):
        if importance is None:
            cols = weight[0].numel() if weight.dim() > 1 else weight.numel()
            importance = torch.ones(cols)
        return rtn.quantize_rtn(name, weight, scheme, importance=importance)
    return rtn.quantize_rtn(name, weight, scheme)
