"""Activation statistics that the algorithms consume: GPTQ's Hessian and per-column moments.

Small accumulators fed with the inputs of a linear layer, flattened to (tokens, in_features).
They hold running means rather than sums so that fp32 stays accurate over many tokens (the same
update GPTQ's reference code uses: ``H *= n / (n + m); H += x^T x / (n + m)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _flat(x: torch.Tensor, cols: int) -> torch.Tensor:
    if x.shape[-1] != cols:
        raise ValueError(f"activation width {x.shape[-1]} does not match {cols} columns")
    return x.detach().reshape(-1, cols)


@dataclass(frozen=True)
class GramRows:
    """A Hessian kept as the inputs it is the second moment of: ``H = x^T x / x.shape[0]``.

    ``x``: fp32 (tokens, cols), the linear's input rows in the order they were seen. Held
    instead of H while there are far fewer tokens than columns (E4B's down_proj at 4 x 512
    calibration tokens: 2048 x 16384, 128 MiB, where H is 1 GiB and rank 2048): GPTQ then
    works on the factor of a diagonal plus this low-rank matrix (``gptq._low_rank_factor``)."""

    x: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.x.T @ self.x / self.x.shape[0]


class HessianAccumulator:
    """Running ``E[x x^T]`` over tokens: the Hessian of the layer-wise squared error up to a factor 2.

    GPTQ is invariant to that factor (the dampening is relative to the mean diagonal), so the
    plain second moment is kept; ``diag()`` is then exactly the importance vector (mean x^2).

    The matrix is symmetric, so ``add`` computes only the blocks on and above the diagonal
    (``block`` x ``block`` tiles) and ``hessian()`` mirrors the rest: for E4B's down_proj
    (16384 columns, 8 tiles) that is 36 of 64 tile products, and this product is the largest
    cost of a calibrated layer at 32 x 512 tokens (16384^2 multiply-adds per token, more than
    the layer's forward). Below the tile size it is one plain product.

    ``rows_up_to``: while the tokens seen are at most this many, their input rows are kept
    instead of the product (``gram()``; no n x n matrix at all); the first batch past it folds
    them into H, batch by batch in the order seen, so H is then what it would have been.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 block: int = 2048, rows_up_to: int = 0):
        self.cols = cols
        self.n = 0
        self.device, self.dtype = torch.device(device), dtype
        self.h: torch.Tensor | None = None  # allocated when the first product is added
        self.rows_up_to = rows_up_to
        self._rows: list[torch.Tensor] = []
        self._sizes: list[int] = []  # tokens of each kept batch (``gram`` may merge the rows)
        edges = list(range(0, cols, block)) + [cols]
        self._tiles = [slice(a, b) for a, b in zip(edges, edges[1:])]

    def add(self, x: torch.Tensor) -> None:
        given = x
        x = _flat(x, self.cols).to(device=self.device, dtype=self.dtype)
        if x.shape[0] == 0:
            return
        if self.h is None and self.n + x.shape[0] <= self.rows_up_to:
            # a view of the caller's activation (no dtype or device change) is copied: it may be reused
            self._rows.append(x.clone() if x.data_ptr() == given.data_ptr() else x)
            self._sizes.append(x.shape[0])
            self.n += x.shape[0]
            return
        self._fold_rows()
        self._add_product(x)

    def _fold_rows(self) -> None:
        if self.h is None:
            self.h = torch.zeros(self.cols, self.cols, device=self.device, dtype=self.dtype)
            rows = self._rows if len(self._rows) == len(self._sizes) else self._rows[0].split(self._sizes)
            self._rows, self._sizes, self.n = [], [], 0
            for r in rows:  # batch by batch, as if never kept
                self._add_product(r)

    def _add_product(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        keep, alpha = self.n / (self.n + m), 1.0 / (self.n + m)
        for a, rows in enumerate(self._tiles):
            xt = x[:, rows].t()
            for cols in self._tiles[a:]:
                tile = self.h[rows, cols]
                tile.mul_(keep)
                tile.addmm_(xt, x[:, cols], alpha=alpha)
        self.n += m

    def gram(self) -> GramRows | None:
        """The kept input rows (see ``rows_up_to``), or None once they were folded into H."""
        if self.h is not None or not self._rows:
            return None
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows)]  # one copy, kept for the stage's next linears
        return GramRows(self._rows[0].to(torch.float32))

    def hessian(self) -> torch.Tensor:
        """fp32 (cols, cols) second moment; zeros if nothing was seen.

        The mirror is written in place (no second 1 GiB matrix for E4B's down_proj): ``add``
        never reads the tiles below the diagonal, so it can go on accumulating afterwards."""
        self._fold_rows()
        for a, rows in enumerate(self._tiles):
            for cols in self._tiles[a + 1:]:
                self.h[cols, rows] = self.h[rows, cols].t()
        return self.h.to(torch.float32)

    def diag(self) -> torch.Tensor:
        if self.h is None:
            return sum(((r.to(torch.float32) ** 2).sum(0) for r in self._rows),
                       torch.zeros(self.cols, device=self.device)) / max(self.n, 1)
        return torch.diagonal(self.h).to(torch.float32).clone()


class ActStats:
    """Per-column mean of x^2 (importance, llama.cpp's imatrix) and mean |x| (AWQ), plus amax."""

    def __init__(self, cols: int, device: torch.device | str = "cpu"):
        self.cols = cols
        self.n = 0
        self.sum_sq = torch.zeros(cols, device=device, dtype=torch.float64)
        self.sum_abs = torch.zeros(cols, device=device, dtype=torch.float64)
        self.amax = torch.zeros(cols, device=device, dtype=torch.float32)

    def add(self, x: torch.Tensor) -> None:
        x = _flat(x, self.cols).to(self.sum_sq.device)
        xf = x.to(torch.float32)
        self.sum_sq += (xf * xf).sum(0).to(torch.float64)
        self.sum_abs += xf.abs().sum(0).to(torch.float64)
        if x.shape[0]:
            self.amax = torch.maximum(self.amax, xf.abs().amax(0))
        self.n += x.shape[0]

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sum_sq / max(self.n, 1)).to(torch.float32)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.n, 1)).to(torch.float32)
