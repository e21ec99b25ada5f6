"""Pieces shared by the methods that decide per-sample data coefficients BEFORE the real step, from one
look-ahead at the current weights (L2RW, MW-Net, IEG).

Weights are kept "mean-1": a worker's lower loss is (1/n) Σ_i u_i ℓ_i over its n rows, and its gradients are
averaged over workers weighted by the rows that count (Method.optimizer_step), so the global lower loss is
Σ_i r u_i ℓ_i with r = share/W (share 1 for real rows, 0 for a stand-in batch; W rows that count over all
workers). The papers' weights ω summing to 1 over the batch are u/W: u = 1 is the plain mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.methods.base import Batch
from metacorrect.methods.metagrad import clean_gradient

__all__ = ["Rows", "WeightTable", "current_state", "mean_clean_gradient", "mean_gradient", "normalised_weights", "rows_of"]


@dataclass
class Rows:
    """This worker's noisy rows in the global lower loss."""

    share: float  # 1 for rows that count, 0 for a stand-in batch
    total: float  # W: rows that count over all workers
    r: float  # d(global lower loss)/d(u_i ℓ_i) = share / W


def rows_of(batch: Batch, collective: Any) -> Rows:
    share = batch.weight / max(len(batch), 1)
    total = float(collective.sum(torch.tensor([float(batch.weight)], dtype=torch.float64,
                                              device=batch.x.device)).item())
    return Rows(share, total, share / total if total > 0 else 0.0)


def current_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trainable parameters, buffers) of the model now, as the functional passes take them."""
    return ({n: p for n, p in model.named_parameters() if p.requires_grad}, dict(model.named_buffers()))


def mean_gradient(grads: dict[str, Tensor], weight: float, collective: Any) -> dict[str, Tensor]:
    """In place: every worker's gradient replaced by the mean weighted by rows that count."""
    if grads:
        collective.weighted_mean_(list(grads.values()), weight)
    return grads


def mean_clean_gradient(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], clean: Batch,
                        collective: Any, weight_decay: float = 0.0) -> tuple[dict[str, Tensor], float]:
    """∇_w [CE on the clean batch + wd/2·‖w‖²] at `params`, averaged over workers; and the clean CE."""
    loss_box: list[Tensor] = []

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, y)
        loss_box.append(ce.detach())
        return ce

    grads = clean_gradient(model, params, buffers, clean.x, clean.label, loss_fn)
    if weight_decay:
        grads = {n: g + weight_decay * params[n].detach() for n, g in grads.items()}
    values = list(grads.values()) + [loss_box[0].reshape(1).to(next(iter(grads.values())).dtype)]
    collective.weighted_mean_(values, clean.weight)
    return grads, float(values[-1][0])


def normalised_weights(scores: Tensor, rows: Rows, collective: Any) -> Tensor:
    """L2R's weights max(0, score) normalised to sum 1 over the global batch, in mean-1 units (× W).

    All zero (no row helps the clean loss) gives all-zero weights, as the official code's guarded sum does.
    """
    clipped = scores.detach().clamp(min=0.0) * rows.share
    total = float(collective.sum(clipped.sum().reshape(1).double()).item())
    if total <= 0.0:
        return torch.zeros_like(clipped)
    return clipped * (rows.total / total)


class WeightTable:
    """The weight each noisy id got the last time it was trained on, gathered from every worker at each step,
    so any worker can answer for any id (the platform's noisy-set evaluation deals ids out differently)."""

    def __init__(self, num_rows: int, device: torch.device | str = "cpu"):
        self.values = torch.full((num_rows,), float("nan"), dtype=torch.float32, device=device)

    def record(self, ids: Tensor, weights: Tensor, share: float, collective: Any) -> None:
        keep = ids if share > 0 else ids[:0]
        vals = weights.detach().float() if share > 0 else weights.detach().float()[:0]
        self.values[collective.all_gather(keep.to(self.values.device))] = collective.all_gather(
            vals.to(self.values.device))

    def lookup(self, ids: Tensor) -> Tensor:
        """Weights of `ids` (NaN for ids not trained on yet)."""
        return self.values[ids.to(self.values.device)].to(ids.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.values.copy_(state["values"].to(self.values.device))
