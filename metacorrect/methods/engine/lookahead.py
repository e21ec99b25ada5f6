"""The look-ahead-first meta-gradient: dL_meta(w')/da for a look-ahead w' from the CURRENT weights, taken
before the real step (the step then uses the updated meta-parameters).

    L(w, a) = Σ_i r ⟨a_i, f_i(w)⟩ + terms without a          (r: `rows.Rows`, a family of `functional`)
    w' = step(w, ∇_w L)                                      (`sgd.Step`: the optimizer's, a plain one, the identity)
    g' = ∇_w [L_meta(w') + wd/2 ‖w'‖²]                        (averaged over workers by clean rows that count)
    dL_meta(w')/da_i = −r · J_w f_i(w) · (s ⊙ g')             (s: the step's effective step sizes)

One virtual parameter dict, one clean gradient at w', one JVP (or the exact double backward): no network
rebuilt, no second-order autograd in the fast path. Works for 1..N workers: ∇_w L and g' are averaged by
rows that count, so every worker's row gradients are what one worker gets on the concatenated batch.

fp16 (`loss_scale`, `scaling.MetaLossScale`): ∇_w L and g' are taken of S_g-scaled losses and unscaled at once;
the tangent is c · s ⊙ g' (c = `MetaLossScale.normalise`), so dL/da carries c: the caller chains dL/da into what
it updates, `unscale_`s the result and asks `update()` whether to apply it.
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
from metacorrect.methods.engine.scaling import MetaLossScale
from metacorrect.methods.engine.sgd import Step, sgd_step


@dataclass
class LookaheadResult:
    grad_a: Tensor  # dL_meta(w')/da × scale, the shape of f (n, C) or (n,)
    meta_loss: float  # clean loss at w', averaged over workers
    rows: Rows  # this worker's rows in the global lower loss
    scale: float = 1.0  # fp16's tangent factor c that grad_a carries (1 otherwise)


def lookahead_meta_grad(model: nn.Module, optimizer: torch.optim.Optimizer, family: Family, x: Tensor,
                        lower: Callable[[Tensor], Tensor] | None, a: Tensor, clean_x: Tensor, clean_y: Tensor, *,
                        step: Step, labels: Tensor | None = None, weight: float | None = None,
                        clean_weight: float | None = None, scale: float = 1.0, collective: Any = None,
                        meta_grad: MetaGrad = "fast", meta_loss: MetaLoss = F.cross_entropy,
                        meta_weight_decay: float = 0.0, loss_scale: MetaLossScale | None = None) -> LookaheadResult:
    """dL_meta(w')/da before the real step.

    lower(a): this worker's lower loss from the real step's forward (graph kept), `scale · lower_loss(family,
    logits, a, labels)` plus any terms without a; its ∇_w makes the look-ahead (not called for the identity
    step). a: this step's targets or weights, the shape of f (passed to `lower` detached). weight /
    clean_weight: rows that count on this worker (default: all). meta_weight_decay: wd/2 ‖w'‖² joins the
    clean loss's gradient (a look-ahead objective with weight decay). loss_scale: fp16's meta loss scale
    (grad_a then carries its tangent factor, `LookaheadResult.scale`; see the module docstring).
    """
    params, buffers = model_state(model)
    names = list(params)
    weight = float(len(x) if weight is None else weight)
    clean_weight = float(len(clean_x) if clean_weight is None else clean_weight)
    rows = rows_of(weight, len(x), collective, scale)
    ls = loss_scale if loss_scale is not None and loss_scale.enabled else None
    rules, bufs = step.resolve(optimizer, model)
    w = {n: p.detach() for n, p in params.items()}
    ahead = w
    if step.moves:
        if lower is None:
            raise ValueError("engine: a moving look-ahead needs the lower loss")
        lower_value = lower(a.detach())
        grads = torch.autograd.grad(ls.scale(lower_value) if ls is not None else lower_value,
                                    [params[n] for n in names], retain_graph=True, allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)}
        if ls is not None:
            if weight == 0 and distributed(collective):  # a stand-in's overflow must not skip the others' update
                grads = {n: torch.zeros_like(g) for n, g in grads.items()}
            ls.unscale_grads_(grads.values())
        if distributed(collective):
            collective.weighted_mean_(list(grads.values()), weight)
        ahead, _ = sgd_step(w, grads, rules, bufs)
    g_new, loss = clean_gradient(model, ahead, buffers, clean_x, clean_y, meta_loss,
                                 scale=ls.grad_scale if ls is not None else 1.0)
    if ls is not None:
        ls.unscale_grads_(g_new.values())
    if meta_weight_decay:
        g_new = {n: g + meta_weight_decay * ahead[n] for n, g in g_new.items()}
    if distributed(collective):
        values = list(g_new.values()) + [loss.reshape(1).to(g_new[names[0]].dtype)]
        collective.weighted_mean_(values, clean_weight)
        loss = values[-1][0]
    sizes = step.sizes(rules, bufs, names)
    factor = ls.normalise(g_new, [sizes]) if ls is not None else 1.0
    tangent = {n: g_new[n] * (sizes[n] * factor if ls is not None else sizes[n]) for n in names}
    if ls is not None and rows.r == 0.0:  # a stand-in: 0 · (an overflowed JVP) would be NaN where it is 0
        grad_a = torch.zeros_like(a)
    else:
        grad_a = target_grad(model, w, buffers, x, tangent, family, labels, rows.r, meta_grad)
    return LookaheadResult(grad_a, float(loss), rows, factor)
