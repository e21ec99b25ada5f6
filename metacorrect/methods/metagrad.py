"""Shared meta-gradient engine: k-step look-ahead meta-gradients for bilinear lower losses.

Every method here trains the student on a lower loss of the form

    L(w, φ) = Σ_i r_i ⟨a_i(φ), f_i(w)⟩  +  terms without φ,        r_i = 1/n for a plain mean,

where `f_i` is a function of the student only and `a_i` is what the meta-parameters φ control:

    family        f_i(w)                         a_i(φ)                     used by
    "soft_ce"     −log_softmax(logits_i)   (C,)  soft target (C,)           MLC, EMLC, Vyas, IEG-λ
    "reverse_kl"  softmax(logits_i)        (C,)  −log ŷ_i (C,)              MSLG: KL(p‖ŷ) = Σ p log p + ⟨p, −log ŷ⟩
    "weighted"    CE(logits_i, ỹ_i)        ()    per-sample weight ()       MW-Net, L2RW, IEG-ω

With the SGD step w' = w − s ⊙ ∇_w L (s: the optimizer's effective per-parameter step) the mixed
Hessian is a product of two Jacobians (EMLC, Prop. 3), so

    dL_meta(w')/da_i = −r_i · J_w f_i(w) · (s ⊙ g'),        g' = ∇_w L_meta(w'),

one forward-mode JVP through the student at the OLD weights; `torch.autograd.backward(a, coeff)` then
finishes with a VJP through the meta-model. No second-order autograd over the backbone.

The loop is real-step-first (EMLC): the real optimizer step is the look-ahead. Per iteration::

    a = targets_fn(ctx)                                   # meta-model output (graph not needed here)
    engine.record(noisy.x, ctx, weight=noisy.weight)      # BEFORE the real step: snapshot w(τ)
    loss = lower_loss(family, model(noisy.x), a.detach()) # + terms without φ
    method.optimizer_step(loss, noisy.weight)             # real step (grads averaged over workers)
    scheduler.step()                                      # optional
    if engine.ready:
        meta_opt.zero_grad()
        stats = engine.meta_backward(clean.x, clean.label, targets_fn)
        if stats["meta_step"]: meta_opt.step()

`targets_fn(context)` must return (with graph to φ) exactly the targets the real step used, detached.

k > 1, `discount="emlc"` (EMLC Prop. 2): one g' at the newest weights, and for each of the last k
recorded steps τ (oldest first) a JVP at its own snapshot w(τ) on its own batch, paired with THAT
batch's targets, discounted by Π_{σ>τ} (1 − s_σ). The meta-optimizer steps once per k real steps.
(The official EMLC code pairs chunk j's JVP with chunk k−1−j's targets; this engine does not.)

`discount="mlc"` (MLC Eq. 4–6, `step_hmlc_K`): call `meta_backward` after every real step; each call
adds `c_t + γ_t · d_{t−1}` to the meta-parameters' .grad, where c_t is the one-step meta-gradient and
γ_t = ⟨(1 − s) ⊙ g'_t, g_t⟩ / ‖g_t‖² with g_t the clean gradient at the old weights; the
meta-optimizer steps every k calls (`stats["meta_step"]`). Needs `meta_params`; zero their .grad
before every call, as MLC does.

`mode="exact"` is the reference path: the same quantity by `create_graph=True` differentiation through
the virtual SGD step (MLC's proxy −⟨s ⊙ g', ∇_w L(w(τ), φ)⟩). `discount="unroll"` (exact only, one
worker) differentiates through an explicit k-step SGD unroll (momentum and weight decay included)
from the oldest snapshot; it is exact only if the recorded steps minimised just the bilinear term.

Batch norm: meta passes use the same train-mode batch statistics as the real step and never update
running statistics (see `frozen_running_stats`). Dropout masks are not replayed (backbones have none).

Workers: g' is averaged over workers weighted by clean rows that count; r_i = weight·scale/(n·W)
with W the total weight over workers, so a stand-in batch (weight 0) contributes nothing and two
workers give what one worker would on the concatenated batch. Meta-gradients of shared
`meta_params` are summed over workers; without `meta_params` (per-sample label tables whose rows are
leaves of `targets_fn`) each worker's row gradients are already complete and are not reduced.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

__all__ = ["FAMILIES", "Family", "MetaGradEngine", "Snapshot", "clean_gradient", "exact_mixed_grads",
           "frozen_running_stats", "lookahead_steps", "lower_jvp", "lower_loss", "lower_terms", "virtual_step"]

Family = Literal["soft_ce", "reverse_kl", "weighted"]
FAMILIES = ("soft_ce", "reverse_kl", "weighted")
MODES = ("fast", "exact")
DISCOUNTS = ("emlc", "mlc", "unroll")
MetaLoss = Callable[[Tensor, Tensor], Tensor]


# ---- lower-loss families ------------------------------------------------------------------------------
def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"metagrad: unknown lower-loss family '{family}' (expected one of {', '.join(FAMILIES)})")


def lower_terms(family: Family, logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """f_i(w): (n, C) for soft_ce (−log_softmax) and reverse_kl (softmax), (n,) for weighted (per-sample CE)."""
    _check_family(family)
    if family == "soft_ce":
        return -F.log_softmax(logits, dim=-1)
    if family == "reverse_kl":
        return F.softmax(logits, dim=-1)
    if labels is None:
        raise ValueError("metagrad: the 'weighted' family needs the labels of the per-sample CE")
    return F.cross_entropy(logits, labels, reduction="none")


def lower_loss(family: Family, logits: Tensor, a: Tensor, labels: Tensor | None = None) -> Tensor:
    """(1/n) Σ_i ⟨a_i, f_i(w)⟩ over this worker's n rows (0 for an empty batch).

    For reverse_kl this is only the φ-dependent part ⟨p, −log ŷ⟩; add Σ p log p (no φ) for the full KL.
    """
    f = lower_terms(family, logits, labels)
    if a.shape != f.shape:
        raise ValueError(f"metagrad: targets have shape {tuple(a.shape)}, family '{family}' expects {tuple(f.shape)}")
    return (a * f).sum() / max(len(logits), 1)


# ---- functional helpers -------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode batch norm keeps using batch statistics but updates no running statistics.

    (`F.batch_norm` gets running stats only when `track_running_stats`; switching it off for the duration
    of a meta pass gives batch statistics without touching `running_mean/var/num_batches_tracked`.)
    """
    switched = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.track_running_stats = False
            switched.append(m)
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextlib.contextmanager
def _train_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Run in the recorded mode (per-module flags are left alone when the top-level mode already matches,
    so deliberately frozen eval-mode parts stay frozen), with running statistics frozen."""
    before = [(m, m.training) for m in model.modules()] if model.training != training else []
    if before:
        model.train(training)
    try:
        with frozen_running_stats(model):
            yield
    finally:
        for m, t in before:
            m.training = t


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _detached(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def lookahead_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Effective per-parameter step s with dw'/dφ = −s · d(∇_w L)/dφ for the optimizer's NEXT step.

    Uses the current lr of each param group (what the scheduler last set; not MLC's `get_lr()`).
    SGD: s = lr; momentum μ: the buffer is constant in φ, s = lr·(1 − dampening) (lr on the first step,
    where torch copies the gradient into the buffer undampened); nesterov: s = lr·(1 + μ). Weight decay
    does not depend on φ. Parameters the optimizer does not update get s = 0. Other optimizers and
    `maximize=True` are rejected: their look-ahead is not a linear function of the gradient.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"metagrad: the look-ahead needs torch.optim.SGD (momentum/nesterov/weight decay allowed), "
                         f"got {type(optimizer).__name__}")
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    steps = dict.fromkeys(names.values(), 0.0)
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("metagrad: SGD(maximize=True) is not supported by the look-ahead")
        lr, mu = float(group["lr"]), float(group.get("momentum", 0.0))
        damp, nesterov = float(group.get("dampening", 0.0)), bool(group.get("nesterov", False))
        for p in group["params"]:
            if id(p) not in names:
                continue
            if mu == 0.0:
                s = lr
            elif nesterov:
                s = lr * (1.0 + mu)
            else:
                first = optimizer.state.get(p, {}).get("momentum_buffer") is None
                s = lr if first else lr * (1.0 - damp)
            steps[names[id(p)]] = s
    return steps


SGDHparams = tuple[float, float, float, bool, float]  # lr, momentum, dampening, nesterov, weight decay


def _sgd_hparams(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, SGDHparams]:
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in names:
                out[names[id(p)]] = (float(g["lr"]), float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)),
                                     bool(g.get("nesterov", False)), float(g.get("weight_decay", 0.0)))
    return out


def _momentum_buffers(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor | None]:
    out: dict[str, Tensor | None] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            out[n] = None if buf is None else buf.detach().clone()
    return out


def _clean_grad_and_loss(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                         y: Tensor, loss_fn: MetaLoss) -> tuple[dict[str, Tensor], Tensor]:
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with frozen_running_stats(model):
        loss = loss_fn(functional_call(model, ({**buffers, **leaves},), (x,)), y)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}, loss.detach()


def clean_gradient(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
                   loss_fn: MetaLoss = F.cross_entropy) -> dict[str, Tensor]:
    """∇_w loss_fn(model_w(x), y) at `params`, in the model's current mode, without BN running-stat updates."""
    return _clean_grad_and_loss(model, params, buffers, x, y, loss_fn)[0]


def lower_jvp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
              tangent: dict[str, Tensor], family: Family, labels: Tensor | None = None) -> Tensor:
    """J_w f(w) · tangent at `params` (forward mode), no BN running-stat updates: (n, C) or (n,)."""
    # torch.autograd.forward_ad rather than torch.func.jvp: the same dual-number forward pass without the
    # functorch wrapping, 10-20% faster on the benchmark's CNNs (identical results to float rounding).
    with frozen_running_stats(model), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), tangent[n]) if n in tangent else p.detach()
                 for n, p in params.items()}
        out = lower_terms(family, functional_call(model, ({**buffers, **duals},), (x,)), labels)
        return fwAD.unpack_dual(out).tangent


def virtual_step(params: dict[str, Tensor], grads: dict[str, Tensor], step: float,
                 momentum: dict[str, Tensor | None] | None = None, mu: float = 0.0,
                 weight_decay: float = 0.0) -> dict[str, Tensor]:
    """Look-ahead weights w' = w − step·(μ·buf + g + wd·w) for methods that decide before the real step.

    MW-Net: plain SGD at the current lr (μ = wd = 0). IEG: meta step 0.1 on the optimizer's momentum
    buffer × 0.9 plus the gradient with weight decay. The buffer does not depend on the meta-parameters,
    so dw'/dφ = −step · d g/dφ: the tangent of `lower_jvp` is step · g'. Entries without a gradient stay.
    """
    out = {}
    for n, w in params.items():
        g = grads.get(n)
        if g is None:
            out[n] = w.detach()
            continue
        d = g + weight_decay * w.detach() if weight_decay else g
        buf = (momentum or {}).get(n)
        if mu and buf is not None:
            d = d + mu * buf
        out[n] = (w.detach() - step * d).detach()
    return out


def exact_mixed_grads(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                      lower_fn: Callable[[Tensor], Tensor], coeffs: Sequence[Tensor],
                      tangent: dict[str, Tensor]) -> list[Tensor]:
    """d/dc ⟨tangent, ∇_w lower_fn(model_w(x))⟩ by double backward (the reference for `lower_jvp` paths).

    `lower_fn(logits)` must build the lower loss from leaves `coeffs` (per-sample weights, mix coefficients);
    with tangent = step · g' the one-step meta-gradient is the negative of the result.
    """
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with frozen_running_stats(model):
        loss = lower_fn(functional_call(model, ({**buffers, **leaves},), (x,)))
    names = [n for n in leaves if n in tangent]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True)
    proxy = sum((tangent[n] * g).sum() for n, g in zip(names, grads) if g is not None)
    if not isinstance(proxy, Tensor) or not proxy.requires_grad:
        return [torch.zeros_like(c) for c in coeffs]
    out = torch.autograd.grad(proxy, list(coeffs), allow_unused=True)
    return [torch.zeros_like(c) if g is None else g for c, g in zip(coeffs, out)]


# ---- the engine ---------------------------------------------------------------------------------------
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
    steps: dict[str, float]  # lookahead_steps at the time of the step
    hparams: dict[str, SGDHparams]  # per-parameter SGD settings (for the exact unroll)
    training: bool
    momentum: dict[str, Tensor | None] | None = None  # SGD momentum buffers before the step (exact mode only)


class MetaGradEngine:
    """k-step look-ahead meta-gradients of a clean loss w.r.t. the meta-parameters behind the lower-loss targets.

    model, optimizer: the student and its torch.optim.SGD (the real step is the look-ahead).
    family: the lower-loss family ("soft_ce" | "reverse_kl" | "weighted").
    k: look-ahead steps (emlc: snapshots per meta step; mlc: calls per meta step; unroll: unrolled steps).
    mode: "fast" (JVP + VJP) or "exact" (create_graph reference).
    discount: "emlc" (Prop. 2, (1 − s) powers), "mlc" (projection γ, Eq. 4–6), "unroll" (exact k-step unroll).
    collective: platform Collective (None: one worker).
    meta_params: shared meta-parameters (LCN, teacher, VNet); needed for "mlc" and for summing over workers.
    meta_loss: loss_fn(logits, y) of the clean (upper) loss, default cross-entropy.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, family: Family, k: int = 1,
                 mode: str = "fast", discount: str = "emlc", collective: Any = None,
                 meta_params: Sequence[Tensor] | None = None, meta_loss: MetaLoss = F.cross_entropy):
        _check_family(family)
        if mode not in MODES:
            raise ValueError(f"metagrad: mode must be one of {', '.join(MODES)}, got '{mode}'")
        if discount not in DISCOUNTS:
            raise ValueError(f"metagrad: discount must be one of {', '.join(DISCOUNTS)}, got '{discount}'")
        if int(k) < 1:
            raise ValueError(f"metagrad: k must be >= 1, got {k}")
        if discount == "mlc" and not meta_params:
            raise ValueError("metagrad: discount='mlc' accumulates meta-gradients across steps and needs meta_params")
        if discount == "unroll" and mode != "exact":
            raise ValueError("metagrad: discount='unroll' is the exact reference; use mode='exact'")
        if discount == "unroll" and collective is not None and getattr(collective, "distributed", False):
            raise ValueError("metagrad: discount='unroll' runs on one worker only")
        lookahead_steps(optimizer, model)  # reject unsupported optimizers now, not at the first meta step
        self.model, self.optimizer, self.family = model, optimizer, family
        self.k, self.mode, self.discount = int(k), mode, discount
        self.collective = collective
        self.meta_params = [p for p in meta_params] if meta_params else None
        self.meta_loss = meta_loss
        self.snapshots: deque[Snapshot] = deque(maxlen=1 if discount == "mlc" else self.k)
        self._prev: list[Tensor] | None = None  # mlc: the previous accumulated meta-gradient d_{t-1}
        self._count = 0  # mlc: calls since the last meta step

    # ---- recording ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when `meta_backward` should be called now (emlc/unroll: k steps recorded; mlc: one)."""
        return len(self.snapshots) >= (1 if self.discount == "mlc" else self.k)

    def record(self, x: Tensor, context: Any = None, *, labels: Tensor | None = None, weight: float | None = None,
               scale: float = 1.0) -> None:
        """Call right BEFORE the real step: snapshot w(τ), buffers, optimizer step sizes, the batch and context.

        weight: rows that count on this worker (Batch.weight; default len(x)), the same weight the real
        step's gradients are averaged with; scale: the real step minimises scale · lower_loss(...) + (no φ).
        """
        if self.family == "weighted" and labels is None:
            raise ValueError("metagrad: family 'weighted' needs record(..., labels=...) for the per-sample CE")
        names = trainable_names(self.model)
        named = dict(self.model.named_parameters())
        snap = Snapshot(
            params={n: named[n].detach().clone() for n in names},
            buffers=_detached(dict(self.model.named_buffers())),
            x=x.detach(), context=context, labels=None if labels is None else labels.detach(),
            weight=float(len(x) if weight is None else weight), scale=float(scale),
            steps=lookahead_steps(self.optimizer, self.model), hparams=_sgd_hparams(self.optimizer, self.model),
            training=self.model.training,
            momentum=_momentum_buffers(self.optimizer, self.model) if self.mode == "exact" else None,
        )
        self.snapshots.append(snap)

    def reset(self) -> None:
        """Forget recorded steps and the mlc accumulation (e.g. at an epoch boundary)."""
        self.snapshots.clear()
        self._prev, self._count = None, 0

    # ---- meta-gradient ------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return self.collective is not None and getattr(self.collective, "distributed", False)

    def _mean_over_workers(self, grads: dict[str, Tensor], loss: Tensor, weight: float) -> Tensor:
        if not self._distributed():
            return loss
        tensors = list(grads.values()) + [loss.reshape(1).clone()]
        self.collective.weighted_mean_(tensors, weight)
        return tensors[-1][0]

    def _row_factors(self) -> list[float]:
        """r_τ = weight·scale/(n·W_τ) per snapshot, W_τ the total weight over workers (one all-reduce)."""
        local = torch.tensor([s.weight for s in self.snapshots], dtype=torch.float64)
        total = local
        if self._distributed():
            dev = self.collective.device
            total = self.collective.sum(local.to(dev)).cpu()
        out = []
        for s, w in zip(self.snapshots, total.tolist()):
            out.append(0.0 if w <= 0 or len(s.x) == 0 else s.weight * s.scale / (len(s.x) * w))
        return out

    def _targets(self, targets_fn: Callable[[Any], Tensor], snap: Snapshot, shape: torch.Size | None = None) -> Tensor:
        a = targets_fn(snap.context)
        if not isinstance(a, Tensor):
            raise TypeError("metagrad: targets_fn must return a tensor")
        if shape is not None and a.shape != shape:
            raise ValueError(f"metagrad: targets_fn returned shape {tuple(a.shape)}, "
                             f"family '{self.family}' expects {tuple(shape)}")
        return a

    def _discounts(self) -> list[dict[str, float]]:
        """emlc: D_τ = Π_{σ>τ} (1 − s_σ) per parameter (newest snapshot: 1); mlc: 1."""
        snaps = list(self.snapshots)
        out: list[dict[str, float]] = []
        acc = dict.fromkeys(snaps[-1].steps, 1.0)
        for s in reversed(snaps):
            out.append(dict(acc))
            if self.discount == "emlc":
                acc = {n: acc[n] * (1.0 - s.steps.get(n, 0.0)) for n in acc}
        return out[::-1]

    def _accumulate(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
        """Backpropagate Σ ⟨coeff, a⟩ into φ: into .grad (no meta_params) or returned per meta-parameter."""
        if not pairs:
            return [torch.zeros_like(p) for p in self.meta_params] if self.meta_params else None
        outs = [a for a, _ in pairs]
        cots = [c for _, c in pairs]
        if self.meta_params is None:
            torch.autograd.backward(outs, cots)
            return None
        grads = torch.autograd.grad(outs, self.meta_params, cots, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.meta_params, grads)]

    def _one_step_pairs(self, targets_fn, g_new: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(a_τ, dL_meta/da_τ) for every snapshot: fast (JVP) or exact (create_graph proxy)."""
        pairs = []
        for snap, r, disc in zip(self.snapshots, self._row_factors(), self._discounts()):
            if r == 0.0:
                continue
            coef = {n: snap.steps.get(n, 0.0) * disc.get(n, 1.0) for n in g_new}
            if self.mode == "fast":
                tangent = {n: g_new[n] * coef[n] for n in g_new}
                with _train_mode(self.model, snap.training):
                    jv = lower_jvp(self.model, snap.params, snap.buffers, snap.x, tangent, self.family, snap.labels)
                a = self._targets(targets_fn, snap, jv.shape)
                pairs.append((a, -r * jv))
            else:
                leaves = {n: p.detach().clone().requires_grad_(True) for n, p in snap.params.items()}
                names, grads = self._lower_grads(targets_fn, snap, r, leaves)
                proxy = sum(-(coef[n] * (g_new[n] * g).sum()) for n, g in zip(names, grads) if g is not None)
                if isinstance(proxy, Tensor) and proxy.requires_grad:
                    pairs.append((proxy, torch.ones_like(proxy)))
        return pairs

    def _lower_grads(self, targets_fn, snap: Snapshot, r: float,
                     leaves: dict[str, Tensor]) -> tuple[list[str], tuple[Tensor | None, ...]]:
        """∇ of the snapshot's bilinear lower loss w.r.t. `leaves`, with graph (exact paths)."""
        with _train_mode(self.model, snap.training):
            f = lower_terms(self.family, functional_call(self.model, ({**snap.buffers, **leaves},), (snap.x,)),
                            snap.labels)
        a = self._targets(targets_fn, snap, f.shape)
        names = list(leaves)
        return names, torch.autograd.grad(r * (a * f).sum(), [leaves[n] for n in names], create_graph=True,
                                          allow_unused=True)

    def _unroll_pairs(self, targets_fn, clean_x: Tensor, clean_y: Tensor) -> tuple[list[tuple[Tensor, Tensor]], float]:
        """Exact k-step unroll of SGD from the oldest snapshot; returns the meta-loss pair and the weight drift."""
        snaps = list(self.snapshots)
        w = {n: p.detach().clone() for n, p in snaps[0].params.items()}
        bufs = {n: (None if b is None else b.detach().clone()) for n, b in (snaps[0].momentum or {}).items()}
        for snap, r in zip(snaps, self._row_factors()):
            if r == 0.0:
                continue
            with _train_mode(self.model, snap.training):
                leaves = {n: (t if t.requires_grad else t.detach().requires_grad_(True)) for n, t in w.items()}
            names, grads = self._lower_grads(targets_fn, snap, r, leaves)
            new_w = {}
            for n, g in zip(names, grads):
                p = leaves[n]
                g = torch.zeros_like(p) if g is None else g
                if n not in snap.hparams:
                    new_w[n] = p
                    continue
                lr, mu, damp, nesterov, wd = snap.hparams[n]
                d = g + wd * p if wd else g
                if mu:
                    b = bufs.get(n)
                    b = d if b is None else mu * b + (1.0 - damp) * d
                    bufs[n] = b
                    d = d + mu * b if nesterov else b
                new_w[n] = p - lr * d
            w = new_w
        with _train_mode(self.model, self.model.training):
            named_buffers = dict(self.model.named_buffers())
            loss = self.meta_loss(functional_call(self.model, ({**named_buffers, **w},), (clean_x,)), clean_y)
        current = dict(self.model.named_parameters())
        drift = max((float((w[n].detach() - current[n].detach()).abs().max()) for n in w), default=0.0)
        return ([(loss, torch.ones_like(loss))] if loss.requires_grad else []), drift

    def meta_backward(self, clean_x: Tensor, clean_y: Tensor, targets_fn: Callable[[Any], Tensor], *,
                      clean_weight: float | None = None) -> dict[str, float]:
        """Call AFTER the real step: accumulate the k-step meta-gradient into the meta-parameters' .grad.

        clean_x, clean_y: this worker's clean (meta) batch; clean_weight: its rows that count (default len).
        targets_fn(context) -> a: the recorded step's targets with graph to φ, (n, C) or (n,).
        Returns {"meta_loss": clean loss at the new weights, "meta_step": 1.0 if the meta-optimizer should
        step now, "meta_snapshots": snapshots used, "meta_gamma": MLC's discount (mlc only),
        "unroll_drift": max |unrolled − real weights| (unroll only)}.
        """
        if not self.snapshots:
            raise RuntimeError("metagrad: meta_backward called before any record()")
        cw = float(len(clean_x) if clean_weight is None else clean_weight)
        params_now = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        buffers_now = dict(self.model.named_buffers())
        stats: dict[str, float] = {"meta_snapshots": float(len(self.snapshots))}

        if self.discount == "unroll":
            # g' is implicit in the unroll; the reported loss is the same clean loss at the new weights.
            pairs, drift = self._unroll_pairs(targets_fn, clean_x, clean_y)
            stats["unroll_drift"] = drift
            stats["meta_loss"] = float(pairs[0][0].detach()) if pairs else float("nan")
        else:
            g_new, loss = _clean_grad_and_loss(self.model, params_now, buffers_now, clean_x, clean_y, self.meta_loss)
            loss = self._mean_over_workers(g_new, loss, cw)
            stats["meta_loss"] = float(loss)
            pairs = self._one_step_pairs(targets_fn, g_new)
        grads = self._accumulate(pairs)

        if self.discount == "mlc":
            snap = self.snapshots[-1]
            g_old, old_loss = _clean_grad_and_loss(self.model, snap.params, snap.buffers, clean_x, clean_y,
                                                   self.meta_loss)
            self._mean_over_workers(g_old, old_loss, cw)
            num = sum(float(((1.0 - snap.steps.get(n, 0.0)) * g_new[n] * g_old[n]).sum()) for n in g_new)
            den = sum(float((g_old[n] * g_old[n]).sum()) for n in g_old)
            gamma = num / den if den > 0 else 0.0
            stats["meta_gamma"] = gamma
        grads = self._reduce(grads)
        if self.discount == "mlc":
            assert grads is not None
            if self._prev is not None:
                grads = [g + gamma * p for g, p in zip(grads, self._prev)]
            self._prev = [g.detach().clone() for g in grads]
            self._count += 1
            due = self._count >= self.k
            if due:
                self._prev, self._count = None, 0
            self.snapshots.clear()
        else:
            due = True
            self.snapshots.clear()
        if grads is not None:
            for p, g in zip(self.meta_params, grads):
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
        stats["meta_step"] = 1.0 if due else 0.0
        return stats

    def _reduce(self, grads: list[Tensor] | None) -> list[Tensor] | None:
        """Sum the shared meta-parameters' gradients over workers (one all-reduce)."""
        if grads is None or not self._distributed():
            return grads
        flat = self.collective.sum(torch.cat([g.reshape(-1) for g in grads]))
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    # ---- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The recorded snapshots and the mlc accumulation: everything a resumed run needs."""
        return {
            "k": self.k, "mode": self.mode, "discount": self.discount, "family": self.family,
            "snapshots": [vars(s).copy() for s in self.snapshots],
            "prev": None if self._prev is None else [p.clone() for p in self._prev],
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("discount", "family"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"metagrad: checkpoint has {key}='{state.get(key)}', "
                                 f"engine has '{getattr(self, key)}'")
        if self.discount == "unroll" and any(s.get("momentum") is None for s in state["snapshots"]):
            raise ValueError("metagrad: discount='unroll' needs snapshots recorded in mode='exact' (momentum buffers)")
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
