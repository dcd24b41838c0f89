"""AWQ-style activation-aware scaling (Lin et al. 2023, arXiv 2306.00978) as pure tensor functions.

For linears that read the same input ``x``, a per-input-channel scale ``s`` turns ``W x`` into
``(W diag(s)) (diag(s)^-1 x)``: salient channels (large mean |x|) get larger weights, hence
smaller relative rounding error. ``awq_search`` picks ``s = mean|x|^alpha`` (normalised) over
a grid of ``alpha``; ``alpha = 0`` (no scaling) is always a candidate, so the proxy loss never
gets worse than plain RTN. The loss is the diagonal approximation of the layer output error,
``sum_j E[x_j^2] ||(Q(W s)/s - W)[:, j]||^2`` (exact when input channels are uncorrelated).

The ``1/s`` must be absorbed by the operation that produces ``x``. Which ones can in Gemma 3n
(``modeling_gemma3n.Gemma3nTextDecoderLayer``; its RMSNorm is ``norm(x) * weight``, no +1):

- ``pre_feedforward_layernorm`` -> ``mlp.gate_proj``, ``mlp.up_proj``: valid (that norm feeds
  only the MLP): ``absorb_into_norm``.
- ``mlp.up_proj`` -> ``mlp.down_proj``: valid (``down(act(gate) * up)``; the Gaussian top-k
  sparsity acts on ``gate`` only): ``absorb_into_linear``.
- ``input_layernorm`` -> q/k/v: NOT valid. The same normed input also feeds LAuReL, whose output
  is ``x_normed + norm(right(left(x_normed)))``: the identity term cannot be compensated.
- ``v_proj`` -> ``o_proj``: NOT valid. ``v_norm`` is a scale-free RMSNorm per head, which undoes
  any row scaling of ``v_proj``; in KV-consumer layers V also comes from another layer.

So the orchestrator applies AWQ to gate/up and down only; attention linears asked for AWQ are
rounded to nearest and the reason is recorded.
"""
from __future__ import annotations

import torch

from quantize.methods.rtn import as_rows, quantize_rtn
from quantize.schemes import QuantScheme

AWQ_GRID = 20


def awq_search(
    weight_list: list[torch.Tensor],
    act_mean_abs: torch.Tensor,
    scheme: QuantScheme,
    act_mean_sq: torch.Tensor | None = None,
    n_grid: int = AWQ_GRID,
) -> torch.Tensor:
    """Per-input-channel scales (cols,) fp32 for linears sharing one input.

    ``act_mean_abs``: mean |x| per input channel; ``act_mean_sq``: mean x^2 (the loss weights;
    defaults to ``act_mean_abs ** 2``). Returns ones when no candidate beats no scaling.
    """
    a = act_mean_abs.detach().to(torch.float32).reshape(-1).cpu()
    cols = a.numel()
    ws = [as_rows(w).cpu() for w in weight_list]
    for w in ws:
        if w.shape[1] != cols:
            raise ValueError(f"weight with {w.shape[1]} columns does not match {cols} activation channels")
    wts = (act_mean_sq.detach().to(torch.float32).reshape(-1).cpu() if act_mean_sq is not None else a * a)
    plain = QuantScheme.model_validate({**scheme.model_dump(), "method": "rtn", "importance": False})

    def loss(s: torch.Tensor) -> float:
        total = 0.0
        for w in ws:
            deq = quantize_rtn("awq", w * s, plain).dequantize() / s
            total += float((((deq - w) ** 2) * wts).sum())
        return total

    best_s = torch.ones(cols)
    best = loss(best_s)
    base = a.clamp(min=1e-8)
    for k in range(1, n_grid):
        alpha = k / n_grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 in log space
        cur = loss(s)
        if cur < best:
            best, best_s = cur, s
    return best_s


def absorb_into_norm(norm_weight: torch.Tensor, linear_weights: list[torch.Tensor], s: torch.Tensor):
    """(norm weight / s, [W * s per column]): RMSNorm ``norm(x) * weight`` then linears."""
    s = s.to(norm_weight.dtype)
    return norm_weight / s, [w * s.to(w.dtype).unsqueeze(0) for w in linear_weights]


def absorb_into_linear(prev_weight: torch.Tensor, next_weight: torch.Tensor, s: torch.Tensor):
    """(prev rows / s, next columns * s): ``next(f(...) * prev(x))`` with ``prev`` linear."""
    return prev_weight / s.to(prev_weight.dtype).unsqueeze(1), next_weight * s.to(next_weight.dtype).unsqueeze(0)
