"""Labels-first look-ahead: the meta-gradient BEFORE the real step (MSLG, meta soft labels; Vyas Alg. 1).

`metagrad.MetaGradEngine` is real-step-first: the real step is the look-ahead and the meta-parameters
learn one step late, which suits persistent meta-models (teacher, LCN). Methods whose label parameters
are updated and then used by the same step (MSLG step 5–6, Vyas Algorithm 1 "labels first, then
model") need the look-ahead first. With the same bilinear lower loss (metagrad's families)

    L(w, a) = (scale / W) Σ_i ⟨a_i, f_i(w)⟩,   w' = w − s ⊙ D(∇_w L),   g' = ∇_w L_meta(w'),
    dL_meta(w')/da_i = −(scale / W) · J_w f_i(w) · (s ⊙ g'),

where D is SGD's step direction (momentum buffer and weight decay do not depend on a, so they move w'
but not its Jacobian) and s the optimizer's effective step (`lookahead_steps`), or a fixed plain-SGD
step (`step=`, MSLG's official α = 0.5). One virtual parameter dict, one clean gradient at w', one
forward-mode JVP (`metagrad.lower_jvp`): no deep copies, no second-order autograd. `mode="exact"` is
the `create_graph=True` reference used by the tests (one worker).

Workers: ∇_w L and g' are averaged over workers weighted by the rows that count, W is the total noisy
weight, so the row gradients of every worker are what one worker would get on the concatenated batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metacorrect.methods.metagrad import (Family, MetaLoss, _clean_grad_and_loss, _momentum_buffers, _sgd_hparams,
                                          frozen_running_stats, lookahead_steps, lower_jvp)


@dataclass
class LookaheadResult:
    grad_a: Tensor  # dL_meta(w')/da, same shape as a
    meta_loss: float  # clean loss at w' (this worker's meta batch)


def optimizer_lookahead(params: dict[str, Tensor], grads: dict[str, Tensor], optimizer: torch.optim.Optimizer,
                 model: nn.Module, step: float | None = None) -> dict[str, Tensor]:
    """w' as the optimizer's next SGD step from `grads` would make it (dampening, nesterov, the first step's
    buffer, weight decay, per-group lr); with `step`, a plain SGD step of that size. Works on graphs too
    (the exact path). `metagrad.virtual_step` is the fixed-step form IEG and MW-Net prescribe."""
    if step is not None:
        return {n: p - step * grads[n] for n, p in params.items()}
    hparams = _sgd_hparams(optimizer, model)
    buffers = _momentum_buffers(optimizer, model)
    out = {}
    for n, p in params.items():
        if n not in hparams:
            out[n] = p
            continue
        lr, mu, damp, nesterov, wd = hparams[n]
        d = grads[n] + wd * p if wd else grads[n]
        if mu:
            buf = buffers.get(n)
            buf = d if buf is None else mu * buf + (1.0 - damp) * d
            d = d + mu * buf if nesterov else buf
        out[n] = p - lr * d
    return out


def labels_first_meta_grad(model: nn.Module, optimizer: torch.optim.Optimizer, family: Family, x: Tensor,
                           lower: Callable[[Tensor], Tensor], a: Tensor, clean_x: Tensor, clean_y: Tensor, *,
                           labels: Tensor | None = None, scale: float = 1.0, weight: float | None = None,
                           clean_weight: float | None = None, collective: Any = None, step: float | None = None,
                           mode: str = "fast", meta_loss: MetaLoss = F.cross_entropy) -> LookaheadResult:
    """dL_meta(w')/da for the look-ahead w' from the CURRENT weights, before the real step.

    lower(a): this worker's lower loss from the real step's forward (train mode, graph kept), with its
    φ-dependent part `scale · lower_loss(family, logits, a, labels)` plus any terms without a; its ∇_w is
    the virtual step's gradient. a: this step's targets (n, C) or (n,) (fast: passed to `lower` detached;
    exact: must carry the graph to whatever the caller differentiates). weight / clean_weight: rows that
    count on this worker.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    weight = float(len(x) if weight is None else weight)
    clean_weight = float(len(clean_x) if clean_weight is None else clean_weight)
    distributed = collective is not None and collective.distributed
    total = float(collective.sum(torch.tensor([weight], dtype=torch.float64)).item()) if distributed else weight
    steps = {n: step for n in params} if step is not None else lookahead_steps(optimizer, model)

    if mode == "exact":
        if distributed:
            raise ValueError("lookahead: the exact path is a one-worker reference")
        # The real step averages the loss over workers by weight: with one worker that is scale·mean.
        loss = lower(a)
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}
        fast = optimizer_lookahead({n: p.detach() for n, p in params.items()}, grads, optimizer, model, step)
        with frozen_running_stats(model):
            clean_loss = meta_loss(functional_call(model, ({**buffers, **fast},), (clean_x,)), clean_y)
        (grad_a,) = torch.autograd.grad(clean_loss, [a])
        return LookaheadResult(grad_a, float(clean_loss.detach()))

    # ∇_w L of the global batch: this worker's gradient, averaged over workers by rows that count.
    loss = lower(a.detach())
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
    grads = {n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    if distributed:
        collective.weighted_mean_(list(grads.values()), weight)
    w = {n: p.detach() for n, p in params.items()}
    fast = optimizer_lookahead(w, grads, optimizer, model, step)
    g_new, clean_loss = _clean_grad_and_loss(model, fast, buffers, clean_x, clean_y, meta_loss)
    if distributed:
        collective.weighted_mean_(list(g_new.values()), clean_weight)
    tangent = {n: g_new[n] * steps.get(n, 0.0) for n in g_new}
    jv = lower_jvp(model, w, buffers, x, tangent, family, labels)
    r = scale * (weight / max(len(x), 1)) / max(total, 1e-12)  # r_i: this row's share of the global loss
    return LookaheadResult(-r * jv, float(clean_loss))
