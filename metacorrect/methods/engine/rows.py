"""Row factors: each worker's rows in the global lower loss.

A worker's real step minimises scale · (1/n) Σ_i ⟨a_i, f_i⟩ (+ terms without a) over its n rows, and the
gradients are averaged over workers weighted by the rows that count (`weight`: n, or 0 for a stand-in batch).
The global lower loss is therefore Σ_i r ⟨a_i, f_i⟩ with

    r = share · scale / W,     share = weight / n (1 for real rows, 0 for a stand-in),  W = Σ_workers weight,

so a stand-in batch contributes nothing and two workers give what one worker gives on the concatenated batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rows:
    """This worker's rows of one batch in the global lower loss."""

    share: float  # weight per row: 1 for rows that count, 0 for a stand-in batch
    total: float  # W: rows that count over all workers
    r: float  # d(global lower loss)/d⟨a_i, f_i⟩ = share · scale / W

    @property
    def counts(self) -> bool:
        return self.share > 0


def distributed(collective: Any) -> bool:
    return collective is not None and bool(getattr(collective, "distributed", False))


def global_rows(weights: Sequence[float], sizes: Sequence[int], collective: Any,
                scales: Sequence[float] | None = None) -> list[Rows]:
    """Rows of several batches at once (one all-reduce of their weights)."""
    local = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    totals = local
    if distributed(collective):
        totals = collective.sum(local.to(collective.device)).cpu()
    scales = scales if scales is not None else [1.0] * len(local)
    out = []
    for w, n, scale, total in zip(local.tolist(), sizes, scales, totals.tolist()):
        share = w / n if n else 0.0
        out.append(Rows(share, total, share * scale / total if total > 0 and n else 0.0))
    return out


def rows_of(weight: float, n: int, collective: Any, scale: float = 1.0) -> Rows:
    """Rows of one batch of n rows of which `weight` count on this worker."""
    return global_rows([weight], [n], collective, [scale])[0]


def normalised_weights(scores: Tensor, rows: Rows, collective: Any) -> Tensor:
    """max(0, score) normalised to sum 1 over the global batch, in mean-1 units (× W): the weights of
    learning to reweight. All zero (no row helps the clean loss) gives all-zero weights."""
    clipped = scores.detach().clamp(min=0.0) * rows.share
    total = float(collective.sum(clipped.sum().reshape(1).double()).item())
    if total <= 0.0:
        return torch.zeros_like(clipped)
    return clipped * (rows.total / total)
