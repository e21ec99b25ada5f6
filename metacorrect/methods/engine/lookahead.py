"""The look-ahead-first meta-gradient: dL_meta(w')/da for a look-ahead w' from the CURRENT weights, taken
before the real step (the step then uses the updated meta-parameters).

    L(w, a) = Σ_i r ⟨a_i, f_i(w)⟩ + terms without a          (r: `rows.Rows`, a family of `functional`)
    w' = step(w, ∇_w L)                                      (`sgd.Step`: the optimizer's, a plain one, the identity)
    g' = ∇_w [L_meta(w') + wd/2 ‖w'‖²]                        (averaged over workers by clean rows that count)
    dL_meta(w')/da_i = −r · J_w f_i(w) · (s ⊙ g')             (s: the step's effective step sizes)

One virtual parameter dict, one clean gradient at w', one JVP (or the exact double backward): no network
rebuilt, no second-order autograd in the fast path. Works for 1..N workers: ∇_w L and g' are averaged by
rows that count, so every worker's row gradients are what one worker gets on the concatenated batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.methods.engine.functional import (Family, MetaGrad, MetaLoss, clean_gradient, model_state,
                                                   target_grad)
from metacorrect.methods.engine.rows import Rows, distributed, rows_of
from metacorrect.methods.engine.sgd import Step, sgd_step


@dataclass
class LookaheadResult:
    grad_a: Tensor  # dL_meta(w')/da, the shape of f (n, C) or (n,)
    meta_loss: float  # clean loss at w', averaged over workers
    rows: Rows  # this worker's rows in the global lower loss


def lookahead_meta_grad(model: nn.Module, optimizer: torch.optim.Optimizer, family: Family, x: Tensor,
                        lower: Callable[[Tensor], Tensor] | None, a: Tensor, clean_x: Tensor, clean_y: Tensor, *,
                        step: Step, labels: Tensor | None = None, weight: float | None = None,
                        clean_weight: float | None = None, scale: float = 1.0, collective: Any = None,
                        meta_grad: MetaGrad = "fast", meta_loss: MetaLoss = F.cross_entropy,
                        meta_weight_decay: float = 0.0) -> LookaheadResult:
    """dL_meta(w')/da before the real step.

    lower(a): this worker's lower loss from the real step's forward (graph kept), `scale · lower_loss(family,
    logits, a, labels)` plus any terms without a; its ∇_w makes the look-ahead (not called for the identity
    step). a: this step's targets or weights, the shape of f (passed to `lower` detached). weight /
    clean_weight: rows that count on this worker (default: all). meta_weight_decay: wd/2 ‖w'‖² joins the
    clean loss's gradient (a look-ahead objective with weight decay).
    """
    params, buffers = model_state(model)
    names = list(params)
    weight = float(len(x) if weight is None else weight)
    clean_weight = float(len(clean_x) if clean_weight is None else clean_weight)
    rows = rows_of(weight, len(x), collective, scale)
    rules, bufs = step.resolve(optimizer, model)
    w = {n: p.detach() for n, p in params.items()}
    ahead = w
    if step.moves:
        if lower is None:
            raise ValueError("engine: a moving look-ahead needs the lower loss")
        grads = torch.autograd.grad(lower(a.detach()), [params[n] for n in names], retain_graph=True,
                                    allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)}
        if distributed(collective):
            collective.weighted_mean_(list(grads.values()), weight)
        ahead, _ = sgd_step(w, grads, rules, bufs)
    g_new, loss = clean_gradient(model, ahead, buffers, clean_x, clean_y, meta_loss)
    if meta_weight_decay:
        g_new = {n: g + meta_weight_decay * ahead[n] for n, g in g_new.items()}
    if distributed(collective):
        values = list(g_new.values()) + [loss.reshape(1).to(g_new[names[0]].dtype)]
        collective.weighted_mean_(values, clean_weight)
        loss = values[-1][0]
    sizes = step.sizes(rules, bufs, names)
    tangent = {n: g_new[n] * sizes[n] for n in names}
    grad_a = target_grad(model, w, buffers, x, tangent, family, labels, rows.r, meta_grad)
    return LookaheadResult(grad_a, float(loss), rows)
