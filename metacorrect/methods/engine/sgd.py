"""The SGD rule, in one place: step sizes, momentum buffers, the virtual step and the unroll step.

This is the only module that reads an optimizer's `param_groups` or its momentum buffers. One SGD update
(torch.optim.SGD's, with momentum μ, dampening, nesterov and weight decay) on gradient g:

    d = g + wd·w ;  b = d (first step) or μ·b + (1 − dampening)·d ;  d = d + μ·b (nesterov) or b ;  w ← w − lr·d

The buffer b and the weight-decay term do not depend on the meta-parameters, so a look-ahead w' moves with
them only through g: dw'/dφ = −s · dg/dφ with the effective step s (`SGDRule.step_size`).

A look-ahead is one of three `Step`s: the optimizer's own next step (per-group lr, momentum, ...), a fixed
plain step of a given size (optionally on the optimizer's buffers with its own μ and a weight decay), or the
identity (w' = w, s = 1: the first-order score ⟨∇ℓ_i, g'⟩).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
Buffers = dict[str, Tensor | None]


@dataclass(frozen=True)
class SGDRule:
    """One parameter's SGD settings."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def step_size(self, first: bool) -> float:
        """Effective step s with dw'/dφ = −s · dg/dφ; `first`: no momentum buffer yet (torch copies the
        gradient into it undampened)."""
        if self.momentum == 0.0:
            return self.lr
        if self.nesterov:
            return self.lr * (1.0 + self.momentum)
        return self.lr if first else self.lr * (1.0 - self.dampening)

    def apply(self, w: Tensor, g: Tensor, buf: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(w after one update, the new buffer); differentiable when w or g carry a graph."""
        d = g + self.weight_decay * w if self.weight_decay else g
        if self.momentum:
            buf = d if buf is None else self.momentum * buf + (1.0 - self.dampening) * d
            d = d + self.momentum * buf if self.nesterov else buf
        return w - self.lr * d, buf


def _check(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"engine: the look-ahead needs torch.optim.SGD (momentum/nesterov/weight decay allowed), "
                         f"got {type(optimizer).__name__}")
    if any(g.get("maximize", False) for g in optimizer.param_groups):
        raise ValueError("engine: SGD(maximize=True) is not supported by the look-ahead")


def sgd_rules(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, SGDRule]:
    """Each trainable parameter's rule from its param group (the lr the scheduler last set); parameters the
    optimizer does not update have none. Other optimizers and `maximize=True` are rejected: their look-ahead
    is not a linear function of the gradient."""
    _check(optimizer)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for g in optimizer.param_groups:
        rule = SGDRule(float(g["lr"]), float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)),
                       bool(g.get("nesterov", False)), float(g.get("weight_decay", 0.0)))
        for p in g["params"]:
            if id(p) in names:
                out[names[id(p)]] = rule
    return out


def first_group(optimizer: torch.optim.Optimizer) -> SGDRule:
    """The first param group's rule (methods whose papers prescribe one lr or weight decay for the look-ahead)."""
    _check(optimizer)
    g = optimizer.param_groups[0]
    return SGDRule(float(g["lr"]), float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)),
                   bool(g.get("nesterov", False)), float(g.get("weight_decay", 0.0)))


def momentum_buffers(optimizer: torch.optim.Optimizer, model: nn.Module, clone: bool = False) -> Buffers:
    """The optimizer's momentum buffer of each trainable parameter (None before its first step)."""
    out: Buffers = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            out[n] = None if buf is None else (buf.detach().clone() if clone else buf.detach())
    return out


def step_sizes(rules: dict[str, SGDRule], buffers: Buffers, names: list[str]) -> dict[str, float]:
    """s per parameter for the next step under `rules` (0 for parameters without a rule)."""
    return {n: rules[n].step_size(buffers.get(n) is None) if n in rules else 0.0 for n in names}


def lookahead_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """s per trainable parameter for the optimizer's NEXT step."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return step_sizes(sgd_rules(optimizer, model), momentum_buffers(optimizer, model), names)


def sgd_step(params: Params, grads: Params, rules: dict[str, SGDRule], buffers: Buffers) -> tuple[Params, Buffers]:
    """One SGD update of every parameter that has a rule (the others stay): the virtual step on detached
    tensors, the unroll step on graphs. Returns (w', the new buffers)."""
    out, bufs = {}, dict(buffers)
    for n, w in params.items():
        if n not in rules:
            out[n] = w
            continue
        out[n], bufs[n] = rules[n].apply(w, grads[n], buffers.get(n))
    return out, bufs


@dataclass(frozen=True)
class Step:
    """The look-ahead step of a look-ahead-first meta-gradient."""

    kind: Literal["optimizer", "plain", "identity"]
    lr: float = 0.0  # plain: the step size
    momentum: float = 0.0  # plain: μ applied to the optimizer's momentum buffers
    weight_decay: float = 0.0  # plain: weight decay inside the step

    @classmethod
    def optimizer(cls) -> Step:
        """The optimizer's own next step (current lr, momentum, dampening, nesterov, weight decay per group)."""
        return cls("optimizer")

    @classmethod
    def plain(cls, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Step:
        """w' = w − lr·(g + wd·w + μ·buf), buf the optimizer's momentum buffer (if any)."""
        return cls("plain", float(lr), float(momentum), float(weight_decay))

    @classmethod
    def identity(cls) -> Step:
        """w' = w with s = 1: the meta-gradient becomes the first-order score −r·⟨∇f_i, g'⟩."""
        return cls("identity")

    @property
    def moves(self) -> bool:
        return self.kind != "identity"

    def resolve(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[dict[str, SGDRule], Buffers]:
        """(rules, buffers) of this step for every trainable parameter."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.kind == "optimizer":
            return sgd_rules(optimizer, model), momentum_buffers(optimizer, model)
        if self.kind == "plain":
            rule = SGDRule(self.lr, self.momentum, 0.0, False, self.weight_decay)
            buffers = momentum_buffers(optimizer, model) if self.momentum else dict.fromkeys(names)
            return dict.fromkeys(names, rule), buffers
        return {}, dict.fromkeys(names)

    def sizes(self, rules: dict[str, SGDRule], buffers: Buffers, names: list[str]) -> dict[str, float]:
        if self.kind == "identity":
            return dict.fromkeys(names, 1.0)
        return step_sizes(rules, buffers, names)
