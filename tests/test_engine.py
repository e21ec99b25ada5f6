"""The meta-gradient engine (methods/engine/): fast (JVP) vs exact (double backward) vs an independent virtual-step
reference, k-step discounting and batch pairing, BN running stats, workers, checkpoint, look-ahead lr.

Everything runs in float64 on tiny models, so agreement is checked to tight tolerances.
"""
from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metacorrect.methods import engine as mg
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform.collective import Collective
from students import flat

C = 3  # classes
N_TABLE = 40  # rows of the per-sample label table (reverse_kl)


@pytest.fixture(autouse=True)
def _float64(float64_one_thread):
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ---- a tiny "method" per lower-loss family -------------------------------------------------------------
class Setup:
    """Student + SGD + meta-model + targets_fn for one family; deterministic from the seed."""

    def __init__(self, family: str, arch: str = "mlp", seed: int = 0, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.01, nesterov: bool = False, dampening: float = 0.0):
        torch.manual_seed(seed)
        self.family, self.side = family, (8 if arch == "small_cnn" else 4)
        width = 4 if arch == "small_cnn" else 2
        self.model = build_backbone(arch, C, (self.side, self.side, 1), width=width)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   nesterov=nesterov, dampening=dampening)
        d = self.side * self.side
        if family == "soft_ce":  # a small label-correction net: (x, noisy label) -> soft target
            self.meta = nn.Sequential(nn.Linear(d + C, 5), nn.Tanh(), nn.Linear(5, C))
        elif family == "reverse_kl":  # MSLG: per-sample label logits y^d, a = −log softmax(y^d)
            self.meta = nn.ParameterList([nn.Parameter(torch.randn(N_TABLE, C))])
        else:  # MW-Net: weight = VNet(per-sample loss)
            self.meta = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
            with torch.no_grad():  # keep the ReLU units alive for small losses
                self.meta[0].bias.fill_(0.5)

    @property
    def meta_params(self):
        return list(self.meta.parameters())

    def batch(self, n: int, seed: int, shift: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, self.side, self.side, generator=g) + shift
        y = torch.randint(0, C, (n,), generator=g)
        ids = torch.randperm(N_TABLE, generator=g)[:n]
        return x, y, ids

    def context(self, x, y, ids):
        ctx = {"x": x, "y": y, "ids": ids}
        if self.family == "weighted":  # VNet input: the per-sample loss at the recorded weights (detached)
            with torch.no_grad(), mg.frozen_running_stats(self.model):
                ctx["loss"] = F.cross_entropy(self.model(x), y, reduction="none")
        return ctx

    def targets(self, ctx):
        if self.family == "soft_ce":
            inp = torch.cat([ctx["x"].flatten(1), F.one_hot(ctx["y"], C).to(ctx["x"].dtype)], 1)
            return F.softmax(self.meta(inp), -1)
        if self.family == "reverse_kl":
            return -F.log_softmax(self.meta[0][ctx["ids"]], -1)
        return torch.sigmoid(self.meta(ctx["loss"].unsqueeze(1))).squeeze(1)

    def labels(self, y):
        return y if self.family == "weighted" else None

    def warmup(self, seed: int = 99) -> None:
        """A plain CE step so the momentum buffers are non-zero."""
        x, y, _ = self.batch(6, seed)
        self.opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()

    def real_step(self, engine, x, y, ids, weight=None, collective=None):
        """record(), then the real step on the same (detached) targets; returns the context."""
        ctx = self.context(x, y, ids)
        a = self.targets(ctx).detach()
        if engine is not None:
            engine.record(x, ctx, labels=self.labels(y), weight=weight)
        loss = mg.lower_loss(self.family, self.model(x), a, self.labels(y))
        self.opt.zero_grad()
        loss.backward()
        if collective is not None:
            from metacorrect.methods.base import grads_of
            collective.weighted_mean_(grads_of(self.model), float(len(x) if weight is None else weight))
        self.opt.step()
        return ctx

    def meta_grad(self, engine, cx, cy, **kw):
        for p in self.meta_params:
            p.grad = None
        stats = engine.meta_backward(cx, cy, self.targets, **kw)
        return flat([torch.zeros_like(p) if p.grad is None else p.grad for p in self.meta_params]), stats


def reference_one_step(s: Setup, x, y, ids, cx, cy, lr: float) -> torch.Tensor:
    """Independent reference: differentiate L_meta(w'(φ)) through SGD's own update rule
    w' = w − lr·(μ·buf + g + wd·w) (momentum buffer and weight decay), g with create_graph.
    Call before the real step; asserts that w' equals the real step's result afterwards."""
    model, opt = s.model, s.opt
    group = opt.param_groups[0]
    mu, wd = group["momentum"], group["weight_decay"]
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    ctx = s.context(x, y, ids)
    a = s.targets(ctx)
    with mg.frozen_running_stats(model):
        logits = functional_call(model, ({**buffers, **leaves},), (x,))
    loss = mg.lower_loss(s.family, logits, a, s.labels(y))
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True)
    new = {}
    for n, g in zip(names, grads):
        d = g + wd * leaves[n]
        buf = opt.state[params[n]]["momentum_buffer"]
        new[n] = leaves[n] - lr * (mu * buf + d)
    with mg.frozen_running_stats(model):
        meta_loss = F.cross_entropy(functional_call(model, ({**buffers, **new},), (cx,)), cy)
    out = torch.autograd.grad(meta_loss, s.meta_params, allow_unused=True)
    ref = flat([torch.zeros_like(p) if g is None else g for p, g in zip(s.meta_params, out)])
    return ref, {n: w.detach() for n, w in new.items()}


def run_one_step(family, arch, mode, seed=0):
    s = Setup(family, arch, seed=seed)
    s.warmup()
    x, y, ids = s.batch(6, seed=1)
    cx, cy, _ = s.batch(5, seed=2)
    ref, w_virtual = reference_one_step(s, x, y, ids, cx, cy, lr=s.opt.param_groups[0]["lr"])
    engine = mg.MetaGradEngine(s.model, s.opt, family, k=1, meta_grad=mode, meta_params=s.meta_params)
    s.real_step(engine, x, y, ids)
    for n, p in s.model.named_parameters():  # the real step is the look-ahead the reference differentiated
        torch.testing.assert_close(p.detach(), w_virtual[n], rtol=1e-12, atol=1e-12)
    bn_before = {n: b.clone() for n, b in s.model.named_buffers()}
    got, stats = s.meta_grad(engine, cx, cy)
    for n, b in s.model.named_buffers():
        assert torch.equal(b, bn_before[n]), f"meta pass changed buffer {n}"
    return got, ref, stats


# ---- fast vs exact vs reference -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
@pytest.mark.parametrize("family", ["soft_ce", "reverse_kl", "weighted"])
def test_fast_matches_exact_and_reference(family, arch):
    fast, ref, stats = run_one_step(family, arch, "fast")
    exact, ref2, _ = run_one_step(family, arch, "exact")
    assert float(ref.norm()) > 1e-6, "degenerate test: zero meta-gradient"
    assert rel_err(fast, exact) < 1e-4
    assert rel_err(fast, ref) < 1e-4
    assert rel_err(exact, ref2) < 1e-4
    assert stats.meta_step and stats.snapshots == 1


def test_bn_running_stats_untouched_and_model_mode_restored():
    s = Setup("soft_ce", "small_cnn")
    x, y, ids = s.batch(6, seed=1)
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", meta_params=s.meta_params)
    s.real_step(engine, x, y, ids)
    bn = {n: b.clone() for n, b in s.model.named_buffers()}
    assert any("running_mean" in n for n in bn)
    cx, cy, _ = s.batch(5, seed=2)
    g = mg.clean_gradient(s.model, dict(s.model.named_parameters()), dict(s.model.named_buffers()), cx, cy)[0]
    assert set(g) == {n for n, _ in s.model.named_parameters()}
    s.meta_grad(engine, cx, cy)
    assert all(torch.equal(b, bn[n]) for n, b in s.model.named_buffers())
    assert s.model.training and all(m.track_running_stats for m in s.model.modules()
                                    if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_per_row_leaves_without_meta_params(mode):
    """MSLG-style label table: without meta_params the meta-gradient lands in .grad of whatever leaves
    targets_fn uses (here the table), unreduced, equal to the meta_params path; fp16's loss scale (here in
    float64, without autocast) changes neither path by a bit."""
    out = []
    for shared, scaled in ((True, False), (False, False), (True, True), (False, True)):
        s = Setup("reverse_kl", "small_cnn", seed=13)
        s.warmup()
        e = mg.MetaGradEngine(s.model, s.opt, "reverse_kl", meta_grad=mode,
                              meta_params=s.meta_params if shared else None,
                              loss_scale=mg.MetaLossScale(enabled=True) if scaled else None)
        x, y, ids = s.batch(6, seed=1)
        s.real_step(e, x, y, ids)
        cx, cy, _ = s.batch(5, seed=2)
        g, stats = s.meta_grad(e, cx, cy)
        assert stats.finite
        out.append(g)
        rows = s.meta[0].grad.abs().sum(1) > 0
        assert set(torch.nonzero(rows).flatten().tolist()) <= set(ids.tolist())
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-15)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


def test_meta_loss_scale_backs_off_what_overflowed_grows_back_and_round_trips():
    scale = mg.MetaLossScale(enabled=True, init_scale=2.0 ** 16, init_tangent_scale=4.0)
    g, t = torch.tensor([2.0 ** 17, 0.0]), torch.tensor([8.0, float("nan")])
    scale.unscale_grads_([g])
    assert torch.equal(g, torch.tensor([2.0, 0.0])) and scale.update(), "finite: apply, nothing moves yet"
    scale.unscale_([t])  # the tangent side overflowed
    assert not scale.update() and (scale.grad_scale, scale.tangent_scale, scale.skipped) == (2.0 ** 16, 2.0, 1)
    scale.unscale_grads_([torch.tensor([float("inf")])])
    scale.unscale_([torch.tensor([float("nan")])])  # garbage after an overflowed gradient: not the tangent's fault
    assert not scale.update() and (scale.grad_scale, scale.tangent_scale, scale.skipped) == (2.0 ** 15, 2.0, 2)
    state = scale.state_dict()
    state["grad"]["growth_interval"] = state["tangent"]["growth_interval"] = 2
    scale.load_state_dict(state)
    assert scale.update() and scale.update(), "nothing unscaled: finite"
    assert (scale.grad_scale, scale.tangent_scale) == (2.0 ** 16, 4.0), "grown after growth_interval finite updates"
    blob = io.BytesIO()
    torch.save(scale.state_dict(), blob)
    blob.seek(0)
    other = mg.MetaLossScale(enabled=True)
    other.load_state_dict(torch.load(blob, weights_only=True))
    assert other.state_dict() == scale.state_dict()
    # the factor of the tangents: S_t / their largest entry, rounded down to a power of two, used by unscale_
    c = scale.normalise({"w": torch.tensor([0.3, -3.0]), "b": torch.tensor([1.0])}, [{"w": 0.1, "b": 1.0}])
    assert c == 2.0 ** math.floor(math.log2(4.0 / 1.0))
    q = torch.tensor([c * 3.0])
    scale.unscale_([q])
    assert torch.equal(q, torch.tensor([3.0])) and scale.update()
    off = mg.MetaLossScale()
    loss = torch.tensor(2.0)
    off.unscale_([loss])
    assert off.scale(loss) is loss and off.update() and not off.skipped
    assert off.grad_scale == off.tangent_scale == 1.0


# ---- k-step: discount and pairing -----------------------------------------------------------------------
def kstep_terms(s: Setup, snaps, cx, cy, reverse: bool, coefficients: list[float] | None = None) -> torch.Tensor:
    """EMLC Prop. 2 term by term with create_graph: Σ_τ (1−η)^(t−τ) d/dφ[−η ⟨g', ∇_w L_τ(w(τ), φ)⟩],
    each term at its own snapshot and batch; `reverse` pairs batch τ's Jacobian with batch k−1−τ's targets.
    `coefficients` replaces η·(1−η)^(t−τ) per τ (another discount)."""
    model = s.model
    params_now = dict(model.named_parameters())
    g_new = mg.clean_gradient(model, params_now, dict(model.named_buffers()), cx, cy)[0]
    k = len(snaps)
    total = torch.zeros_like(flat(s.meta_params))
    for tau, (w, buffers, x, y, ctx, lr) in enumerate(snaps):
        disc = 1.0
        for later in snaps[tau + 1:]:
            disc *= 1.0 - later[5]
        leaves = {n: p.clone().requires_grad_(True) for n, p in w.items()}
        with mg.frozen_running_stats(model):
            f = mg.lower_terms(s.family, functional_call(model, ({**buffers, **leaves},), (x,)), s.labels(y))
        jac_leaves = list(leaves.values())
        a = s.targets(snaps[k - 1 - tau][4] if reverse else ctx)
        lower = (a * f).sum() / len(x)
        grads = torch.autograd.grad(lower, jac_leaves, create_graph=True)
        coef = lr * disc if coefficients is None else coefficients[tau]
        proxy = -coef * sum((g_new[n] * g).sum() for n, g in zip(leaves, grads))
        out = torch.autograd.grad(proxy, s.meta_params, allow_unused=True)
        total += flat([torch.zeros_like(p) if g is None else g for p, g in zip(s.meta_params, out)])
    return total


@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
def test_kstep_shrink_discount_and_pairing(arch):
    results = {}
    for mode in ("fast", "exact"):
        s = Setup("soft_ce", arch, seed=3)
        s.warmup()
        engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", k=3, meta_grad=mode, meta_params=s.meta_params)
        snaps = []
        for t in range(3):
            x, y, ids = s.batch(6, seed=10 + t, shift=1.5 * t)  # distinguishable batches (targets depend on x)
            snaps.append(({n: p.detach().clone() for n, p in s.model.named_parameters()},
                          {n: b.clone() for n, b in s.model.named_buffers()}, x, y, None,
                          s.opt.param_groups[0]["lr"]))
            assert not engine.ready
            ctx = s.real_step(engine, x, y, ids)
            snaps[-1] = snaps[-1][:4] + (ctx,) + snaps[-1][5:]
        assert engine.ready
        cx, cy, _ = s.batch(5, seed=20)
        got, stats = s.meta_grad(engine, cx, cy)
        assert stats.snapshots == 3 and not engine.ready
        right = kstep_terms(s, snaps, cx, cy, reverse=False)
        wrong = kstep_terms(s, snaps, cx, cy, reverse=True)
        assert rel_err(got, right) < 1e-4, mode
        assert rel_err(wrong, right) > 1e-2, "batches not distinguishable: the pairing check would be vacuous"
        assert rel_err(got, wrong) > 1e-2
        results[mode] = got
    assert rel_err(results["fast"], results["exact"]) < 1e-4


def kstep_window(discount: str, mode: str, momentum: float, arch: str = "mlp", k: int = 3, lr: float = 0.02):
    """One k-step window from the same start under `discount`: (meta-gradient, the snapshots kstep_terms takes)."""
    s = Setup("soft_ce", arch, seed=8, lr=lr, momentum=momentum)
    s.warmup()
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", k=k, meta_grad=mode, discount=discount,
                               meta_params=s.meta_params)
    snaps = []
    for t in range(k):
        x, y, ids = s.batch(6, seed=50 + t, shift=0.5 * t)
        state = ({n: p.detach().clone() for n, p in s.model.named_parameters()},
                 {n: b.clone() for n, b in s.model.named_buffers()}, x, y)
        ctx = s.real_step(engine, x, y, ids)
        snaps.append(state + (ctx, lr))
    cx, cy, _ = s.batch(5, seed=60)
    got, _ = s.meta_grad(engine, cx, cy)
    return got, s, snaps, cx, cy


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_momentum_discount_is_its_formula_and_near_the_unroll(momentum):
    """discount='momentum': snapshot τ's tangent is lr·Σ_{j=0}^{k−1−τ} μ^j · g' (dampening 0, buffers warm),
    fast == exact; against the exact unroll (small lr, so H ≈ 0 holds) it is within 5%, and with momentum the
    paper's Π(1 − η) discount is not (it ignores the buffer that carries each step's gradient forward)."""
    k, lr = 3, 0.02
    fast, s, snaps, cx, cy = kstep_window("momentum", "fast", momentum)
    exact, *_ = kstep_window("momentum", "exact", momentum)
    assert rel_err(fast, exact) < 1e-4
    coefficients = [lr * sum(momentum ** j for j in range(k - tau)) for tau in range(k)]
    assert rel_err(fast, kstep_terms(s, snaps, cx, cy, reverse=False, coefficients=coefficients)) < 1e-4
    unrolled, *_ = kstep_window("unroll", "exact", momentum)
    paper, *_ = kstep_window("shrink", "fast", momentum)
    assert rel_err(fast, unrolled) < 0.05
    if momentum:
        assert rel_err(paper, unrolled) > 0.3
    else:  # no momentum: both discounts are first-order close to the unroll
        assert rel_err(paper, unrolled) < 0.05


def test_unroll_reference_reproduces_real_steps_and_finite_differences():
    """discount='unroll' differentiates through the explicit 3-step SGD unroll (momentum, wd): the unrolled
    weights equal the real ones, and the meta-gradient matches a central finite difference of the real run."""
    s = Setup("soft_ce", "small_cnn", seed=5)
    s.warmup()
    start = copy.deepcopy((s.model.state_dict(), s.opt.state_dict()))
    batches = [s.batch(6, seed=30 + t, shift=0.5 * t) for t in range(3)]
    cx, cy, _ = s.batch(5, seed=40)
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", k=3, meta_grad="exact", discount="unroll",
                               meta_params=s.meta_params)
    for x, y, ids in batches:
        s.real_step(engine, x, y, ids)
    bn_after_steps = {n: b.clone() for n, b in s.model.named_buffers()}
    got, stats = s.meta_grad(engine, cx, cy)
    assert stats.unroll_drift < 1e-12
    assert all(torch.equal(b, bn_after_steps[n]) for n, b in s.model.named_buffers())

    direction = torch.randn_like(got)

    def run_real(eps: float) -> float:
        s.model.load_state_dict(start[0])
        s.opt.load_state_dict(copy.deepcopy(start[1]))  # SGD adopts the loaded buffers and updates them in place
        base = [p.detach().clone() for p in s.meta_params]
        offset = 0
        with torch.no_grad():
            for p in s.meta_params:
                p.add_(eps * direction[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        for x, y, ids in batches:
            s.real_step(None, x, y, ids)
        with torch.no_grad(), mg.frozen_running_stats(s.model):
            loss = float(F.cross_entropy(s.model(cx), cy))
        with torch.no_grad():
            for p, b in zip(s.meta_params, base):
                p.copy_(b)
        return loss

    eps = 1e-5
    fd = (run_real(eps) - run_real(-eps)) / (2 * eps)
    assert abs(fd - float(got @ direction)) < 1e-6 * max(1.0, abs(fd))

    # k = 1: the unroll is the one-step exact meta-gradient, i.e. the fast path
    one = {}
    for mode, discount in (("fast", "shrink"), ("exact", "unroll")):
        t = Setup("weighted", "small_cnn", seed=6)
        t.warmup()
        e = mg.MetaGradEngine(t.model, t.opt, "weighted", k=1, meta_grad=mode, discount=discount,
                              meta_params=t.meta_params)
        x, y, ids = t.batch(6, seed=1)
        t.real_step(e, x, y, ids)
        one[mode], _ = t.meta_grad(e, cx, cy)
    assert rel_err(one["fast"], one["exact"]) < 1e-4


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_mlc_projection_discount(mode):
    """discount='projection' (MLC Eq. 4–6): the 2nd call adds c_2 + γ·c_1 with γ = ⟨(1−η)g'_2, g_2⟩/‖g_2‖²,
    and the meta step is due every k calls."""
    s = Setup("soft_ce", "mlp", seed=7)
    s.warmup()
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", k=2, meta_grad=mode, discount="projection",
                               meta_params=s.meta_params)
    plain = Setup("soft_ce", "mlp", seed=7)  # the same run, one-step meta-gradients c_t
    plain.warmup()
    e1 = mg.MetaGradEngine(plain.model, plain.opt, "soft_ce", k=1, meta_params=plain.meta_params)
    lr = s.opt.param_groups[0]["lr"]
    out, cs, due = [], [], []
    for t in range(2):
        x, y, ids = s.batch(6, seed=50 + t, shift=t)
        cx, cy, _ = s.batch(5, seed=60 + t)
        w_old = {n: p.detach().clone() for n, p in s.model.named_parameters()}
        s.real_step(engine, x, y, ids)
        g, stats = s.meta_grad(engine, cx, cy)
        out.append(g)
        due.append(stats.meta_step)
        plain.real_step(e1, x, y, ids)
        c, _ = plain.meta_grad(e1, cx, cy)
        cs.append(c)
        buffers = dict(s.model.named_buffers())
        g_old = flat(mg.clean_gradient(s.model, w_old, buffers, cx, cy)[0].values())
        g_new = flat(mg.clean_gradient(s.model, dict(s.model.named_parameters()), buffers, cx, cy)[0].values())
        gamma = float((1 - lr) * (g_new @ g_old) / (g_old @ g_old))
        assert abs(stats.gamma - gamma) < 1e-10
    assert due == [0.0, 1.0]
    assert rel_err(out[0], cs[0]) < 1e-4
    assert rel_err(out[1], cs[1] + gamma * cs[0]) < 1e-4


# ---- look-ahead first -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["optimizer", "plain", "plain_momentum", "identity"])
@pytest.mark.parametrize("meta_grad", ["fast", "exact"])
def test_lookahead_first_matches_differentiating_through_the_step(kind, meta_grad):
    """dL_meta(w′)/da from `lookahead_meta_grad` against L_meta differentiated through SGD's update rule written
    out here (warm momentum buffers, weight decay), with create_graph; identity: −d/da ⟨g_c, ∇_w L(w, a)⟩."""
    s = Setup("soft_ce", "small_cnn", seed=11)
    s.warmup()
    x, y, _ = s.batch(6, seed=70)
    cx, cy, _ = s.batch(5, seed=71)
    group = s.opt.param_groups[0]
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    step = {"optimizer": mg.Step.optimizer(), "plain": mg.Step.plain(0.3),
            "plain_momentum": mg.Step.plain(0.1, momentum=0.5, weight_decay=0.02), "identity": mg.Step.identity()}[kind]
    a = F.softmax(torch.randn(6, C, generator=torch.Generator().manual_seed(72)), -1)
    params = dict(s.model.named_parameters())
    buffers = {n: b.clone() for n, b in s.model.named_buffers()}

    def logits_at(w, inputs):
        with mg.frozen_running_stats(s.model):
            return functional_call(s.model, ({**buffers, **w},), (inputs,))

    leaf = a.clone().requires_grad_(True)
    w = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    grads = dict(zip(w, torch.autograd.grad(mg.lower_loss("soft_ce", logits_at(w, x), leaf), list(w.values()),
                                            create_graph=True)))
    bufs = {n: s.opt.state[params[n]]["momentum_buffer"] for n in w}
    if kind == "identity":
        g_c = torch.autograd.grad(F.cross_entropy(logits_at(w, cx), cy), list(w.values()))
        proxy = sum((g * grads[n]).sum() for n, g in zip(w, g_c))
        (expected,) = torch.autograd.grad(-proxy, [leaf])
    else:
        step_lr, step_mu, step_wd = {"optimizer": (lr, mu, wd), "plain": (0.3, 0.0, 0.0),
                                     "plain_momentum": (0.1, 0.5, 0.02)}[kind]
        ahead = {n: w[n] - step_lr * (grads[n] + step_wd * w[n] + step_mu * bufs[n]) for n in w}
        (expected,) = torch.autograd.grad(F.cross_entropy(logits_at(ahead, cx), cy), [leaf])

    logits = s.model(x)
    result = mg.lookahead_meta_grad(s.model, s.opt, "soft_ce", x, lambda t: mg.lower_loss("soft_ce", logits, t), a,
                                    cx, cy, step=step, meta_grad=meta_grad)
    assert rel_err(result.grad_a, expected) < 1e-8
    assert expected.abs().max() > 0


# ---- look-ahead learning rate ---------------------------------------------------------------------------
def test_lookahead_uses_current_scheduler_lr():
    s = Setup("soft_ce", "mlp", seed=8, lr=0.5)
    sched = torch.optim.lr_scheduler.MultiStepLR(s.opt, milestones=[1], gamma=0.1)
    s.warmup()
    sched.step()  # epoch 1 is a milestone: lr 0.5 -> 0.05 (MLC's get_lr() would report 0.005 here)
    assert s.opt.param_groups[0]["lr"] == pytest.approx(0.05)
    steps = mg.lookahead_steps(s.opt, s.model)
    assert all(v == pytest.approx(0.05) for v in steps.values())
    x, y, ids = s.batch(6, seed=1)
    cx, cy, _ = s.batch(5, seed=2)
    ref_new, _ = reference_one_step(s, x, y, ids, cx, cy, lr=0.05)
    ref_old, _ = reference_one_step(s, x, y, ids, cx, cy, lr=0.5)
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", meta_params=s.meta_params)
    s.real_step(engine, x, y, ids)
    got, _ = s.meta_grad(engine, cx, cy)
    assert rel_err(got, ref_new) < 1e-4
    assert rel_err(got, ref_old) > 1e-1


def test_lookahead_steps_momentum_variants():
    m = nn.Linear(2, 2)
    nesterov = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    assert all(v == pytest.approx(0.19) for v in mg.lookahead_steps(nesterov, m).values())
    damp = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    # first step: torch copies the gradient into the buffer undampened
    assert all(v == pytest.approx(0.1) for v in mg.lookahead_steps(damp, m).values())
    m(torch.randn(3, 2)).sum().backward()
    damp.step()
    assert all(v == pytest.approx(0.05) for v in mg.lookahead_steps(damp, m).values())
    groups = torch.optim.SGD([{"params": [m.weight], "lr": 0.2}, {"params": [m.bias]}], lr=0.1)
    assert mg.lookahead_steps(groups, m) == {"weight": pytest.approx(0.2), "bias": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="SGD"):
        mg.lookahead_steps(torch.optim.Adam(m.parameters()), m)
    with pytest.raises(ValueError, match="maximize"):
        mg.lookahead_steps(torch.optim.SGD(m.parameters(), lr=0.1, maximize=True), m)
    with pytest.raises(ValueError, match="meta_params"):
        mg.MetaGradEngine(m, groups, "soft_ce", discount="projection")
    with pytest.raises(ValueError, match="family"):
        mg.MetaGradEngine(m, groups, "cross_entropy")


def test_nesterov_dampening_fast_matches_exact():
    for kw in ({"nesterov": True}, {"dampening": 0.3}):
        out = {}
        for mode, discount in (("fast", "shrink"), ("exact", "shrink"), ("exact", "unroll")):
            s = Setup("reverse_kl", "mlp", seed=9, **kw)
            s.warmup()
            e = mg.MetaGradEngine(s.model, s.opt, "reverse_kl", k=1, meta_grad=mode, discount=discount,
                                  meta_params=s.meta_params)
            x, y, ids = s.batch(6, seed=70)
            s.real_step(e, x, y, ids)
            cx, cy, _ = s.batch(5, seed=80)
            out[mode, discount], _ = s.meta_grad(e, cx, cy)
        assert rel_err(out["fast", "shrink"], out["exact", "shrink"]) < 1e-4, kw
        assert rel_err(out["fast", "shrink"], out["exact", "unroll"]) < 1e-4, kw
        s = Setup("reverse_kl", "mlp", seed=9, **kw)  # no warm-up: the first step has no momentum buffer
        e = mg.MetaGradEngine(s.model, s.opt, "reverse_kl", k=2, meta_grad="exact", discount="unroll",
                              meta_params=s.meta_params)
        for t in range(2):
            x, y, ids = s.batch(6, seed=70 + t)
            s.real_step(e, x, y, ids)
        _, stats = s.meta_grad(e, cx, cy)
        assert stats.unroll_drift < 1e-12, kw  # the unroll reproduces torch's nesterov/dampening steps


# ---- checkpoint -----------------------------------------------------------------------------------------
def test_state_dict_restores_snapshot_buffer():
    def fresh():
        s = Setup("reverse_kl", "small_cnn", seed=11)
        return s, mg.MetaGradEngine(s.model, s.opt, "reverse_kl", k=3, meta_params=s.meta_params)

    s, engine = fresh()
    s.warmup()
    batches = [s.batch(6, seed=90 + t, shift=t) for t in range(3)]
    cx, cy, _ = s.batch(5, seed=95)
    for x, y, ids in batches[:2]:
        s.real_step(engine, x, y, ids)
    blob = io.BytesIO()
    torch.save({"model": s.model.state_dict(), "opt": s.opt.state_dict(), "meta": s.meta.state_dict(),
                "engine": engine.state_dict()}, blob)
    s.real_step(engine, *batches[2])
    expected, _ = s.meta_grad(engine, cx, cy)

    r, resumed = fresh()
    blob.seek(0)
    ckpt = torch.load(blob, weights_only=False)
    r.model.load_state_dict(ckpt["model"])
    r.opt.load_state_dict(copy.deepcopy(ckpt["opt"]))
    r.meta.load_state_dict(ckpt["meta"])
    resumed.load_state_dict(ckpt["engine"])
    assert len(resumed.snapshots) == 2 and not resumed.ready
    r.real_step(resumed, *batches[2])
    got, stats = r.meta_grad(resumed, cx, cy)
    assert stats.snapshots == 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)

    t, lost = fresh()  # without the buffer the same step has one snapshot only: a different meta-gradient
    t.model.load_state_dict(ckpt["model"])
    t.opt.load_state_dict(copy.deepcopy(ckpt["opt"]))
    t.meta.load_state_dict(ckpt["meta"])
    t.real_step(lost, *batches[2])
    assert not lost.ready


# ---- two workers = one worker on the concatenated batch -----------------------------------------------
SPLIT = (3, 7)  # uneven: rank 0 holds noisy rows [0, 3), rank 1 rows [3, 7)
CLEAN_SPLIT = (2, 5)


def two_worker_run(rank: int, world: int, k: int, stand_in: bool, collective, s: Setup):
    """k real steps then one meta_backward, on this rank's rows (rank -1: one worker with all rows)."""
    engine = mg.MetaGradEngine(s.model, s.opt, "soft_ce", k=k, collective=collective, meta_params=s.meta_params)
    for t in range(k):
        x, y, ids = s.batch(SPLIT[1], seed=100 + t, shift=t)
        weight = None
        if rank == 0:
            x, y, ids = x[:SPLIT[0]], y[:SPLIT[0]], ids[:SPLIT[0]]
        elif rank == 1:
            x, y, ids = x[SPLIT[0]:], y[SPLIT[0]:], ids[SPLIT[0]:]
            if stand_in:
                weight = 0.0
        elif stand_in:
            x, y, ids = x[:SPLIT[0]], y[:SPLIT[0]], ids[:SPLIT[0]]
        s.real_step(engine, x, y, ids, weight=weight, collective=collective)
    cx, cy, _ = s.batch(CLEAN_SPLIT[1], seed=200)
    if rank == 0:
        cx, cy = cx[:CLEAN_SPLIT[0]], cy[:CLEAN_SPLIT[0]]
    elif rank == 1:
        cx, cy = cx[CLEAN_SPLIT[0]:], cy[CLEAN_SPLIT[0]:]
    g, stats = s.meta_grad(engine, cx, cy)
    return g, stats


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        collective = Collective(world, rank)
        results = {}
        for stand_in in (False, True):
            s = Setup("soft_ce", "mlp", seed=12)
            s.warmup()
            g, stats = two_worker_run(rank, world, 2, stand_in, collective, s)
            results[stand_in] = (g, stats.meta_loss, [p.detach().clone() for p in s.model.parameters()])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_worker(tmp_path):
    """Rank 1 in a spawned process, rank 0 in this one (one interpreter start instead of two); gloo on a file
    rendezvous. Uneven rows per worker, k = 2, and a second run where rank 1 only holds stand-in batches."""
    proc = torch.multiprocessing.get_context("spawn").Process(
        target=_worker, args=(1, 2, str(tmp_path / "pg"), str(tmp_path)))
    proc.start()
    try:
        _worker(0, 2, str(tmp_path / "pg"), str(tmp_path))
    finally:
        proc.join(timeout=120)
    assert proc.exitcode == 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for stand_in in (False, True):
        s = Setup("soft_ce", "mlp", seed=12)
        s.warmup()
        single, stats = two_worker_run(-1, 1, 2, stand_in, None, s)
        assert float(single.norm()) > 1e-6
        for r in range(2):
            g, loss, weights = ranks[r][stand_in]
            for w, p in zip(weights, s.model.parameters()):  # the real steps agree, so the snapshots do
                torch.testing.assert_close(w, p.detach(), rtol=1e-10, atol=1e-12)
            assert abs(loss - stats.meta_loss) < 1e-10
            assert rel_err(g, single) < 1e-8, (r, stand_in)
