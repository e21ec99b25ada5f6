"""The real-step-first meta-gradient: the real optimizer step is the look-ahead, and the meta-parameters φ
learn one step late, which suits persistent meta-models (a label-correction network, a teacher).

Per iteration::

    a = targets_fn(ctx)                                   # meta-model output (graph not needed here)
    engine.record(noisy.x, ctx, weight=noisy.weight)      # BEFORE the real step: snapshot w(τ)
    loss = lower_loss(family, model(noisy.x), a.detach()) # + terms without φ
    method.optimizer_step(loss, noisy.weight)             # real step (grads averaged over workers)
    if engine.ready:
        meta_opt.zero_grad()
        result = engine.meta_backward(clean.x, clean.label, targets_fn)   # also accumulates into .grad
        if result.meta_step: meta_opt.step()

`targets_fn(context)` must return, with graph to φ, exactly the targets the real step used.

One step (k = 1): with g' = ∇_w L_meta(w') at the new weights and s the step the optimizer took,
dL_meta/da_i = −r_i · J_w f_i(w(τ)) · (s ⊙ g'): one JVP at the snapshot, then one VJP through the meta-model.

k > 1 (`discount`): one g' at the newest weights and, for each of the last k recorded steps τ, a JVP at its
own snapshot w(τ) on its own batch, paired with THAT batch's targets, along D_τ ⊙ g':

- "shrink" (H ≈ I, plain SGD; EMLC's Prop. 2): D_τ = s_τ · Π_{σ>τ} (1 − s_σ).
- "momentum" (H ≈ 0, momentum buffers followed): D_τ = s_τ + Σ_{σ>τ} lr_σ · c_τ · μ^{σ−τ} (· μ with
  nesterov), c_τ the share of step τ's gradient its buffer took in. Without momentum D_τ = s_τ.
- "projection" (MLC's Eq. 4–6): call after every real step; each call adds c_t + γ_t·d_{t−1} with
  γ_t = ⟨(1 − s) ⊙ g'_t, g_t⟩ / ‖g_t‖², g_t the clean gradient at the old weights; the meta-optimizer steps
  every k calls. Needs `meta_params`; zero their .grad before every call.
- "unroll" (exact only, one worker): differentiates through an explicit k-step SGD unroll (momentum and
  weight decay included) from the oldest snapshot: the reference the others are measured against (exact
  if the recorded steps minimised just the bilinear term).

Batch norm: meta passes use the train-mode batch statistics of the real step and update no running
statistics. Workers: g' is averaged over workers by clean rows that count and r_τ is the row factor
(`rows.global_rows`); meta-gradients of shared `meta_params` are summed over workers, per-row leaves of
`targets_fn` (label tables) are complete on each worker and are not reduced.

fp16 (`loss_scale`, `scaling.MetaLossScale`): g' (and γ's clean gradients) are taken of S_g · L_meta and
unscaled at once; the tangents are c · D_τ ⊙ g' (c = `MetaLossScale.normalise`), so dL/da and the VJP through
the meta-model carry c. `meta_backward` unscales the meta-gradients, asks `update()` (which also covers whatever
the caller unscaled before it, e.g. EMLC's teacher losses) and adds them to .grad only when finite
(`MetaGradResult.finite`). A recorded step whose real step was skipped is dropped (`drop_last`): the weights
did not move, so it is no look-ahead.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metacorrect.methods.engine.functional import (Family, MetaGrad, MetaLoss, check_family, check_meta_grad,
                                                   clean_gradient, lower_terms, model_state, recorded_mode,
                                                   target_grad)
from metacorrect.methods.engine.rows import distributed, global_rows
from metacorrect.methods.engine.scaling import MetaLossScale
from metacorrect.methods.engine.sgd import SGDRule, lookahead_steps, momentum_buffers, sgd_rules, sgd_step

DISCOUNTS = ("shrink", "momentum", "projection", "unroll")
TargetsFn = Callable[[Any], Tensor]


@dataclass
class Snapshot:
    """One recorded real step: everything to redo its lower loss at the old weights."""

    params: dict[str, Tensor]  # trainable parameters w(τ) before the step (detached clones)
    buffers: dict[str, Tensor]  # module buffers before the step (BN running stats for eval-mode parts)
    x: Tensor
    context: Any  # what targets_fn needs (noisy labels, ids, teacher inputs, ...)
    labels: Tensor | None  # the 'weighted' family's CE labels
    weight: float  # rows that count on this worker (the weight the real step's gradients were averaged with)
    scale: float  # the real step's loss holds scale · lower_loss(...)
    steps: dict[str, float]  # effective step s of each parameter at the time of the step
    rules: dict[str, dict[str, Any]]  # each parameter's SGD settings (SGDRule fields; plain values for checkpoints)
    training: bool
    momentum: dict[str, Tensor | None] | None = None  # SGD momentum buffers before the step (unroll only)

    def rule(self, name: str) -> SGDRule | None:
        r = self.rules.get(name)
        return None if r is None else SGDRule(**r)


@dataclass
class MetaGradResult:
    """What one `meta_backward` computed (it has also been added to the meta-parameters' .grad)."""

    meta_loss: float  # clean loss at the new weights
    meta_step: bool  # whether the meta-optimizer should step now
    snapshots: int  # recorded steps used
    grads: list[Tensor] | None  # the meta-gradient of each meta-parameter (None without meta_params)
    target_grads: list[Tensor] = field(default_factory=list)  # dL_meta/da_τ per snapshot used (not unroll)
    gamma: float | None = None  # γ_t (discount "projection")
    unroll_drift: float | None = None  # max |unrolled − real weights| (discount "unroll")
    finite: bool = True  # fp16: False when the meta-gradient overflowed on some worker (nothing added to .grad)


class MetaGradEngine:
    """k-step meta-gradients of a bilinear lower loss, the real step being the look-ahead.

    model, optimizer: the student and its torch.optim.SGD. family: the lower-loss family. k: look-ahead steps
    (shrink/momentum/unroll: snapshots per meta step; projection: calls per meta step). meta_grad: "fast" (JVP + VJP)
    or "exact" (double backward). discount: see the module docstring. collective: the platform's (None: one
    worker). meta_params: shared meta-parameters (needed for "projection" and for summing over workers). meta_loss:
    loss_fn(logits, y) of the clean (upper) loss. loss_scale: fp16's meta loss scale (None or switched off: none).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, family: Family, k: int = 1,
                 meta_grad: MetaGrad = "fast", discount: str = "shrink", collective: Any = None,
                 meta_params: Sequence[Tensor] | None = None, meta_loss: MetaLoss = F.cross_entropy,
                 loss_scale: MetaLossScale | None = None):
        check_family(family)
        check_meta_grad(meta_grad)
        if discount not in DISCOUNTS:
            raise ValueError(f"engine: discount must be one of {', '.join(DISCOUNTS)}, got '{discount}'")
        if int(k) < 1:
            raise ValueError(f"engine: k must be >= 1, got {k}")
        if discount == "projection" and not meta_params:
            raise ValueError("engine: discount='projection' accumulates meta-gradients across steps and needs "
                             "meta_params")
        if discount == "unroll" and meta_grad != "exact":
            raise ValueError("engine: discount='unroll' is the exact reference; use meta_grad='exact'")
        if discount == "unroll" and distributed(collective):
            raise ValueError("engine: discount='unroll' runs on one worker only")
        sgd_rules(optimizer, model)  # reject unsupported optimizers now, not at the first meta step
        self.model, self.optimizer, self.family = model, optimizer, family
        self.k, self.meta_grad, self.discount = int(k), meta_grad, discount
        self.collective = collective
        self.meta_params = list(meta_params) if meta_params else None
        self.meta_loss = meta_loss
        self.loss_scale = loss_scale if loss_scale is not None and loss_scale.enabled else None
        self.snapshots: deque[Snapshot] = deque(maxlen=1 if discount == "projection" else self.k)
        self._prev: list[Tensor] | None = None  # projection: the previous accumulated meta-gradient d_{t-1}
        self._count = 0  # projection: calls since the last meta step

    # ---- recording ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when `meta_backward` should be called now (k steps recorded; projection: one)."""
        return len(self.snapshots) >= (1 if self.discount == "projection" else self.k)

    def record(self, x: Tensor, context: Any = None, *, labels: Tensor | None = None, weight: float | None = None,
               scale: float = 1.0) -> None:
        """Call right BEFORE the real step: snapshot w(τ), buffers, step sizes, the batch and context.

        weight: rows that count on this worker (default len(x)), the weight the real step's gradients are
        averaged with; scale: the real step minimises scale · lower_loss(...) + (terms without φ).
        """
        if self.family == "weighted" and labels is None:
            raise ValueError("engine: family 'weighted' needs record(..., labels=...) for the per-sample CE")
        params, buffers = model_state(self.model)
        self.snapshots.append(Snapshot(
            params={n: p.detach().clone() for n, p in params.items()},
            buffers={n: b.detach().clone() for n, b in buffers.items()},
            x=x.detach(), context=context, labels=None if labels is None else labels.detach(),
            weight=float(len(x) if weight is None else weight), scale=float(scale),
            steps=lookahead_steps(self.optimizer, self.model),
            rules={n: asdict(r) for n, r in sgd_rules(self.optimizer, self.model).items()},
            training=self.model.training,
            momentum=momentum_buffers(self.optimizer, self.model, clone=True) if self.discount == "unroll" else None,
        ))

    def drop_last(self) -> None:
        """Forget the newest recorded step: its real step was skipped (fp16 overflow), the weights did not move."""
        if self.snapshots:
            self.snapshots.pop()

    def reset(self) -> None:
        """Forget recorded steps and the projection accumulation."""
        self.snapshots.clear()
        self._prev, self._count = None, 0

    # ---- discounts ----------------------------------------------------------------------------------
    def directions(self) -> list[dict[str, float]]:
        """D_τ per snapshot and parameter: the factor of g' in snapshot τ's tangent."""
        snaps = list(self.snapshots)
        names = list(snaps[-1].steps)
        out = []
        for t, snap in enumerate(snaps):
            later = snaps[t + 1:]
            d = {}
            for n in names:
                s = snap.steps.get(n, 0.0)
                if self.discount == "shrink":
                    for other in later:
                        s *= 1.0 - other.steps.get(n, 0.0)
                elif self.discount == "momentum":
                    s += self._carried(snap, later, n)
                d[n] = s
            out.append(d)
        return out

    @staticmethod
    def _carried(snap: Snapshot, later: list[Snapshot], name: str) -> float:
        """Σ_{σ>τ} lr_σ · c_τ · μ^{σ−τ} (· μ with nesterov): step τ's gradient as later steps apply it
        through their momentum buffers."""
        rule = snap.rule(name)
        if rule is None or rule.momentum == 0.0 or not later:
            return 0.0
        # s_τ = lr_τ · c_τ without nesterov (c_τ = 1 on the buffer's first step, else 1 − dampening);
        # nesterov needs dampening 0, so c_τ = 1.
        carry = 1.0 if rule.nesterov or rule.lr == 0.0 else snap.steps.get(name, 0.0) / rule.lr
        total, mu_power = 0.0, 1.0
        for other in later:
            o = other.rule(name)
            if o is None:
                break
            mu_power *= o.momentum
            total += o.lr * carry * mu_power * (o.momentum if o.nesterov else 1.0)
        return total

    # ---- meta-gradient ------------------------------------------------------------------------------
    def _targets(self, targets_fn: TargetsFn, snap: Snapshot, shape: torch.Size) -> Tensor:
        a = targets_fn(snap.context)
        if not isinstance(a, Tensor):
            raise TypeError("engine: targets_fn must return a tensor")
        if a.shape != shape:
            raise ValueError(f"engine: targets_fn returned shape {tuple(a.shape)}, "
                             f"family '{self.family}' expects {tuple(shape)}")
        return a

    def _pairs(self, targets_fn: TargetsFn, g_new: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(a_τ, dL_meta/da_τ) for every snapshot that has rows."""
        snaps = list(self.snapshots)
        rows = global_rows([s.weight for s in snaps], [len(s.x) for s in snaps], self.collective,
                           [s.scale for s in snaps])
        pairs = []
        for snap, row, direction in zip(snaps, rows, self.directions()):
            if row.r == 0.0:
                continue
            tangent = {n: g_new[n] * direction.get(n, 0.0) for n in g_new}
            with recorded_mode(self.model, snap.training):
                grad_a = target_grad(self.model, snap.params, snap.buffers, snap.x, tangent, self.family,
                                     snap.labels, row.r, self.meta_grad)
            pairs.append((self._targets(targets_fn, snap, grad_a.shape), grad_a))
        return pairs

    def _unroll(self, targets_fn: TargetsFn, clean_x: Tensor, clean_y: Tensor, scale: float = 1.0
                ) -> tuple[list[tuple[Tensor, Tensor]], float, float]:
        """Exact k-step SGD unroll from the oldest snapshot: (the meta-loss pair, the loss, the weight drift)."""
        snaps = list(self.snapshots)
        rows = global_rows([s.weight for s in snaps], [len(s.x) for s in snaps], self.collective,
                           [s.scale for s in snaps])
        w = {n: p.detach().clone().requires_grad_(True) for n, p in snaps[0].params.items()}
        bufs = dict(snaps[0].momentum or {})
        for snap, row in zip(snaps, rows):
            if row.r == 0.0:
                continue
            with recorded_mode(self.model, snap.training):
                f = lower_terms(self.family, functional_call(self.model, ({**snap.buffers, **w},), (snap.x,)),
                                snap.labels)
            a = self._targets(targets_fn, snap, f.shape)
            names = list(w)
            grads = torch.autograd.grad(row.r * (a * f).sum(), [w[n] for n in names], create_graph=True,
                                        allow_unused=True)
            grads = {n: torch.zeros_like(w[n]) if g is None else g for n, g in zip(names, grads)}
            rules = {n: r for n in names if (r := snap.rule(n)) is not None}
            w, bufs = sgd_step(w, grads, rules, bufs)
        with recorded_mode(self.model, self.model.training):
            loss = self.meta_loss(functional_call(self.model, ({**dict(self.model.named_buffers()), **w},),
                                                  (clean_x,)), clean_y)
        current = dict(self.model.named_parameters())
        drift = max((float((w[n].detach() - current[n].detach()).abs().max()) for n in w), default=0.0)
        seed = torch.ones_like(loss) if scale == 1.0 else torch.full_like(loss, scale)
        return ([(loss, seed)] if loss.requires_grad else []), float(loss.detach()), drift

    def _backward(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
        """VJP of Σ ⟨coeff, a⟩ into φ: into the leaves' .grad (no meta_params) or returned per meta-parameter."""
        if not pairs:
            return [torch.zeros_like(p) for p in self.meta_params] if self.meta_params else None
        outs, cots = [a for a, _ in pairs], [c for _, c in pairs]
        if self.meta_params is None:
            if self.loss_scale is not None:  # the leaves' own .grad cannot be unscaled here: unscale the cotangents
                cots = [c.clone() for c in cots]
                self.loss_scale.unscale_(cots)
            torch.autograd.backward(outs, cots)
            return None
        grads = torch.autograd.grad(outs, self.meta_params, cots, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.meta_params, grads)]

    def _mean_over_workers(self, grads: dict[str, Tensor], loss: Tensor, weight: float) -> Tensor:
        if not distributed(self.collective):
            return loss
        tensors = list(grads.values()) + [loss.reshape(1).clone()]
        self.collective.weighted_mean_(tensors, weight)
        return tensors[-1][0]

    def _sum_over_workers(self, grads: list[Tensor] | None) -> list[Tensor] | None:
        """Sum the shared meta-parameters' gradients over workers (one all-reduce)."""
        if grads is None or not distributed(self.collective):
            return grads
        flat = self.collective.sum(torch.cat([g.reshape(-1) for g in grads]))
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def meta_backward(self, clean_x: Tensor, clean_y: Tensor, targets_fn: TargetsFn, *,
                      clean_weight: float | None = None) -> MetaGradResult:
        """Call AFTER the real step: the k-step meta-gradient, returned and added to the meta-parameters' .grad
        (or to the leaves of `targets_fn` without meta_params).

        clean_x, clean_y: this worker's clean (meta) batch; clean_weight: its rows that count (default len).
        targets_fn(context) -> a: the recorded step's targets with graph to φ, (n, C) or (n,).
        """
        if not self.snapshots:
            raise RuntimeError("engine: meta_backward called before any record()")
        cw = float(len(clean_x) if clean_weight is None else clean_weight)
        params_now, buffers_now = model_state(self.model)
        used = len(self.snapshots)
        gamma = drift = None
        ls = self.loss_scale
        scale = ls.tangent_scale if ls is not None else 1.0  # the tangents, dL/da and the VJP carry it
        if self.discount == "unroll":
            pairs, loss, drift = self._unroll(targets_fn, clean_x, clean_y, scale)
        else:
            g_new, loss_t = clean_gradient(self.model, params_now, buffers_now, clean_x, clean_y, self.meta_loss,
                                           scale=ls.grad_scale if ls is not None else 1.0)
            if ls is not None:
                ls.unscale_grads_(g_new.values())
            loss = float(self._mean_over_workers(g_new, loss_t, cw))
            if ls is not None:
                scale = ls.normalise(g_new, self.directions())
            pairs = self._pairs(targets_fn, g_new if ls is None else {n: g * scale for n, g in g_new.items()})
            if self.discount == "projection":
                gamma = self._gamma(g_new, clean_x, clean_y, cw)
        grads = self._sum_over_workers(self._backward(pairs))
        if self.discount == "projection":
            assert grads is not None
            if self._prev is not None:  # d_{t-1} is kept unscaled
                grads = [g + gamma * (p if ls is None else p * scale) for g, p in zip(grads, self._prev)]
        finite = True
        if ls is not None:
            ls.unscale_(grads or [])
            finite = ls.update()
        due = finite
        if self.discount == "projection" and finite:  # an overflowed call leaves the accumulation as it was
            assert grads is not None
            self._prev = [g.detach().clone() for g in grads]
            self._count += 1
            due = self._count >= self.k
            if due:
                self._prev, self._count = None, 0
        self.snapshots.clear()
        if grads is not None and finite:
            for p, g in zip(self.meta_params, grads):
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
        targets = [] if self.discount == "unroll" else [c.detach() for _, c in pairs]
        if ls is not None and self.meta_params is not None:
            targets = [c / scale for c in targets]
        return MetaGradResult(meta_loss=loss, meta_step=due, snapshots=used, grads=grads, target_grads=targets,
                              gamma=gamma, unroll_drift=drift, finite=finite)

    def _gamma(self, g_new: dict[str, Tensor], clean_x: Tensor, clean_y: Tensor, cw: float) -> float:
        """γ_t = ⟨(1 − s) ⊙ g'_t, g_t⟩ / ‖g_t‖², g_t the clean gradient at the old weights."""
        snap = self.snapshots[-1]
        ls = self.loss_scale
        g_old, old_loss = clean_gradient(self.model, snap.params, snap.buffers, clean_x, clean_y, self.meta_loss,
                                         scale=ls.grad_scale if ls is not None else 1.0)
        if ls is not None:
            ls.unscale_grads_(g_old.values())
        self._mean_over_workers(g_old, old_loss, cw)
        num = sum(float(((1.0 - snap.steps.get(n, 0.0)) * g_new[n] * g_old[n]).sum()) for n in g_new)
        den = sum(float((g_old[n] * g_old[n]).sum()) for n in g_old)
        return num / den if den > 0 else 0.0

    # ---- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The recorded snapshots and the projection accumulation: everything a resumed run needs."""
        return {
            "k": self.k, "meta_grad": self.meta_grad, "discount": self.discount, "family": self.family,
            "snapshots": [vars(s).copy() for s in self.snapshots],
            "prev": None if self._prev is None else [p.clone() for p in self._prev],
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("discount", "family"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"engine: checkpoint has {key}='{state.get(key)}', engine has '{getattr(self, key)}'")
        device = next(self.model.parameters()).device
        self.snapshots.clear()
        for s in state["snapshots"]:
            self.snapshots.append(Snapshot(**_to_device(s, device)))
        self._prev = None if state["prev"] is None else [p.to(device) for p in state["prev"]]
        self._count = int(state["count"])


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
