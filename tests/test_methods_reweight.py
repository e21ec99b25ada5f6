"""IEG, MW-Net and L2RW on real tiny torch models (no Ray): their look-ahead meta-gradients against independent
references (per-sample gradient loops, double backward through the virtual step), pseudo labels, strong views,
two workers = one, resume, config validation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metacorrect.config import ExperimentConfig
from metacorrect.methods import Batch
from metacorrect.methods import engine as mg
from metacorrect.methods.ieg import logit_norm, pseudo_labels, sharpen
from metacorrect.platform.collective import Collective
from gloo import run_two_ranks
from students import flat, make_method

C, SIDE, WIDTH = 10, 8, 4
NAMES = ("ieg", "mwnet", "l2rw")


def make(name: str, seed: int = 0, arch: str = "small_cnn", collective=None, **method):
    """A tiny student (BatchNorm in small_cnn) + SGD (momentum, wd) + the method on one worker."""
    return make_method({"name": name, **method}, classes=C, side=SIDE, width=WIDTH, num_noisy=100, arch=arch,
                       seed=seed, weight_decay=5e-3, collective=collective)


def batch(seed: int, n: int, weight: float | None = None, views: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIDE, SIDE, generator=g)
    extra = torch.randn(views, n, 1, SIDE, SIDE, generator=g) if views else None
    return Batch(torch.arange(n), x, torch.randint(0, C, (n,), generator=g), float(n) if weight is None else weight,
                 views=extra)


def warm_up(method, seed: int = 50) -> None:
    """One plain CE step, so the optimizer has momentum buffers (IEG's look-ahead uses them)."""
    b = batch(seed, 8)
    method.optimizer.zero_grad()
    F.cross_entropy(method.model(b.x), b.label).backward()
    method.optimizer.step()


def state_of(model):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    return params, {n: b.clone() for n, b in model.named_buffers()}


def forward(model, params, buffers, x):
    with mg.frozen_running_stats(model):
        return functional_call(model, ({**buffers, **params},), (x,))


# ---- L2RW ---------------------------------------------------------------------------------------------
def l2rw_reference(model, noisy: Batch, clean: Batch) -> torch.Tensor:
    """max(0, ⟨∇ℓ_i, g_clean⟩) normalised to mean 1, with ∇ℓ_i from a loop of per-sample backward passes."""
    params, buffers = state_of(model)
    names = list(params)
    clean_loss = F.cross_entropy(forward(model, params, buffers, clean.x), clean.label)
    g_clean = torch.autograd.grad(clean_loss, [params[n] for n in names])
    losses = F.cross_entropy(forward(model, params, buffers, noisy.x), noisy.label, reduction="none")
    scores = []
    for i in range(len(losses)):
        g_i = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True)
        scores.append(sum((a * b).sum() for a, b in zip(g_i, g_clean)))
    clipped = torch.stack(scores).clamp(min=0)
    return clipped * len(clipped) / clipped.sum()


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_l2rw_weights_match_a_per_sample_gradient_loop(mode, float64_one_thread):
    method = make("l2rw", meta_grad=mode)
    warm_up(method)
    noisy, clean = batch(1, 12), batch(2, 8)
    expected = l2rw_reference(method.model, noisy, clean)
    weights, _, _ = method.example_weights(noisy, clean)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    assert (expected == 0).any() and (expected > 0).any()  # some rows rejected, some kept: not a vacuous check


def test_l2rw_step_trains_on_the_weighted_loss(float64_one_thread):
    a, b = make("l2rw"), make("l2rw")
    noisy, clean = batch(3, 12), batch(4, 8)
    weights, _, _ = b.example_weights(noisy, clean)
    a.step(noisy, clean)
    b.optimizer.zero_grad()
    (weights * F.cross_entropy(b.model(noisy.x), noisy.label, reduction="none")).mean().backward()
    b.optimizer.step()
    torch.testing.assert_close(flat(a.model.parameters()), flat(b.model.parameters()), rtol=1e-10, atol=1e-12)


# ---- MW-Net -------------------------------------------------------------------------------------------
def mwnet_reference(method, noisy: Batch, clean: Batch, normalise: bool) -> torch.Tensor:
    """MW-Net's own computation: w'(φ) = w − lr·∇_w mean(V(ℓ)·ℓ) with create_graph, CE at w', ∂/∂φ."""
    model, vnet = method.model, method.vnet
    lr = method.optimizer.param_groups[0]["lr"]
    params, buffers = state_of(model)
    losses = F.cross_entropy(forward(model, params, buffers, noisy.x), noisy.label, reduction="none")
    v = vnet(losses.detach())
    u = v * len(v) / v.sum() if normalise else v
    grads = torch.autograd.grad((u * losses).mean(), list(params.values()), create_graph=True)
    ahead = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    meta = F.cross_entropy(forward(model, ahead, buffers, clean.x), clean.label)
    return flat(torch.autograd.grad(meta, list(vnet.parameters())))


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_mwnet_vnet_gradient_matches_the_double_backward_reference(mode, normalise, float64_one_thread):
    method = make("mwnet", meta_grad=mode, normalise=normalise)
    warm_up(method)
    noisy, clean = batch(5, 12), batch(6, 8)
    expected = mwnet_reference(copy.deepcopy(method), noisy, clean, normalise)
    method.step(noisy, clean)
    got = flat(p.grad for p in method.vnet.parameters())
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-13)
    assert expected.abs().max() > 0


def test_mwnet_real_step_uses_the_updated_vnet(float64_one_thread):
    method = make("mwnet")
    reference = copy.deepcopy(method)
    noisy, clean = batch(7, 12), batch(8, 8)
    method.step(noisy, clean)
    reference.vnet.load_state_dict(method.vnet.state_dict())  # the VNet after its meta step
    losses = F.cross_entropy(reference.model(noisy.x), noisy.label, reduction="none")
    reference.optimizer.zero_grad()
    (reference.vnet(losses.detach()).detach() * losses).mean().backward()
    reference.optimizer.step()
    torch.testing.assert_close(flat(method.model.parameters()), flat(reference.model.parameters()),
                               rtol=1e-10, atol=1e-12)


# ---- IEG ----------------------------------------------------------------------------------------------
def ieg_reference(method, noisy: Batch, clean: Batch, guess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IEG's own meta step (`meta_optimize`): leaves ω, λ; w' = w − 0.1·(0.9·buf + ∇(Σ ω CE(mix λ)) + wd·w);
    probe CE + wd/2·‖w'‖² at w'; ∂/∂(ω, λ) by double backward through w'. ω in mean-1 units (ω·n)."""
    model, opt = method.model, method.optimizer
    m = method.mcfg
    wd = opt.param_groups[0]["weight_decay"]
    params, buffers = state_of(model)
    n = len(noisy)
    u = torch.ones(n, requires_grad=True)
    lam = torch.full((n,), m.mix_init, requires_grad=True)
    onehot = F.one_hot(noisy.label, C).double()
    target = lam[:, None] * onehot + (1 - lam[:, None]) * guess
    logits = forward(model, params, buffers, noisy.x)
    lower = (u * -(target * F.log_softmax(logits, 1)).sum(1)).sum() / n
    grads = torch.autograd.grad(lower, list(params.values()), create_graph=True)
    live = dict(model.named_parameters())
    ahead = {}
    for (name, w), g in zip(params.items(), grads):
        buf = opt.state[live[name]]["momentum_buffer"]
        ahead[name] = w - m.meta_stepsize * (m.meta_momentum * buf + g + wd * w)
    meta = F.cross_entropy(forward(model, ahead, buffers, clean.x), clean.label)
    meta = meta + wd / 2 * sum((w * w).sum() for w in ahead.values())
    return torch.autograd.grad(meta, [u, lam])


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_ieg_weight_and_label_mix_meta_gradients_match_the_reference(mode, float64_one_thread):
    method = make("ieg", meta_grad=mode)
    warm_up(method)
    noisy, clean = batch(9, 12, views=1), batch(10, 8)
    guess = pseudo_labels([method.model(noisy.x), method.model(noisy.views[0])])
    g_weight, g_mix = ieg_reference(method, noisy, clean, guess)
    co = method.data_coefficients(noisy, clean, guess)
    torch.testing.assert_close(co.grad_weight, g_weight, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(co.grad_mix, g_mix, rtol=1e-8, atol=1e-14)
    # L2R weights and the binary label choice follow from the signs.
    expected = (-g_weight).clamp(min=0)
    torch.testing.assert_close(co.weight, expected * len(expected) / expected.sum())
    assert torch.equal(co.mix, (g_mix < 0).double())
    assert 0 < int(co.mix.sum()) < len(co.mix) or (g_mix != 0).all()


def test_ieg_step_moves_the_model_and_the_ema_follows(float64_one_thread):
    method = make("ieg")
    before = flat(method.model.parameters()).clone()
    outs = [method.step(batch(11 + i, 12, views=1), batch(20 + i, 8)) for i in range(3)]
    assert not torch.equal(flat(method.model.parameters()), before)
    for out in outs:
        assert {"train_loss", "meta_loss", "consistency", "weight_zero_fraction", "given_label_fraction"} <= set(out)
        assert out["consistency"] > 0  # the views differ from the originals
    last = batch(13, 12, views=1)  # the platform reads ω*·B of the last step per id (mean 1 over the batch)
    torch.testing.assert_close(method.sample_weights(last).mean(), torch.tensor(1.0, dtype=torch.float32))
    ema = method.eval_models()["ema"]
    # TF's num_updates warm-up: decay min(0.999, (1+t)/(10+t)) = 2/11, 3/12, 4/13 for t = 1, 2, 3.
    assert method.ema_updates == 3
    between = [(e - b).abs().max() for e, b in zip(ema.parameters(), method.model.parameters())]
    assert max(between) > 0
    torch.testing.assert_close(flat(ema.buffers()), flat(method.model.buffers()))


# ---- pseudo labels and strong views -------------------------------------------------------------------
def test_sharpening_and_pseudo_labels_on_hand_made_logits(float64_one_thread):
    p = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    expected = torch.tensor([[0.25, 0.09, 0.04], [0.0625, 0.0625, 0.25]])  # p² (T = 0.5) normalised
    torch.testing.assert_close(sharpen(p, 0.5), expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(sharpen(p, 1.0), p)
    assert torch.equal(sharpen(p, 0.05).argmax(1), p.argmax(1)) and sharpen(p, 0.05).max() > 0.99

    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # RMS of the tensor: sqrt(6/6) = 1
    b = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])  # RMS sqrt(16/6)
    torch.testing.assert_close(logit_norm(b), b / (16 / 6) ** 0.5)
    probs = (F.softmax(a, 1) + F.softmax(b / (16 / 6) ** 0.5, 1)) / 2
    torch.testing.assert_close(pseudo_labels([a, b], 0.5), sharpen(probs, 0.5))
    torch.testing.assert_close(pseudo_labels([a, b], 0.5).sum(1), torch.ones(2))


@pytest.mark.parametrize("policy", ["affine", "randaugment"])
def test_strong_views_and_pseudo_labels_are_deterministic_under_a_seed(policy):
    from metacorrect.platform.batches import Normaliser, to_batch

    g = torch.Generator().manual_seed(0)
    raw = {"id": torch.arange(16), "image": torch.randint(0, 256, (16, SIDE, SIDE, 1), generator=g, dtype=torch.uint8),
           "label": torch.randint(0, C, (16,), generator=g), "true_label": torch.zeros(16, dtype=torch.long)}
    norm = Normaliser(torch.tensor([0.3]), torch.tensor([0.4]))
    model = make("ieg").model.eval()

    def labels(seed: int):
        torch.manual_seed(seed)
        b, _ = to_batch(raw, norm, "shift", views=2, strong=policy)
        assert b.views.shape == (2, 16, 1, SIDE, SIDE) and b.views.dtype == b.x.dtype
        with torch.no_grad():
            return b.views, pseudo_labels([model(b.x)] + [model(v) for v in b.views])

    (v1, p1), (v2, p2), (v3, p3) = labels(3), labels(3), labels(4)
    assert torch.equal(v1, v2) and torch.equal(p1, p2)
    assert not torch.equal(v1, v3) and not torch.equal(p1, p3)
    assert not torch.equal(v1[0], v1[1])  # two different views of the same images


# ---- two workers --------------------------------------------------------------------------------------
def _two_worker_data(rank: int, stand_in: bool):
    """8 noisy + 8 clean rows split 4/4 over two ranks; rank -1: one worker holding what both hold."""
    noisy, clean = batch(60, 8, views=1), batch(61, 8)
    if rank < 0:
        n = 4 if stand_in else 8
        return (Batch(noisy.ids[:n], noisy.x[:n], noisy.label[:n], float(n), views=noisy.views[:, :n]), clean)
    r = slice(4 * rank, 4 * rank + 4)
    weight = 0.0 if stand_in and rank == 1 else 4.0
    return (Batch(noisy.ids[r], noisy.x[r], noisy.label[r], weight, views=noisy.views[:, r]),
            Batch(clean.ids[r], clean.x[r], clean.label[r], 4.0))


def _two_worker_results(rank: int, collective) -> dict:
    """MW-Net with weights normalised over the global batch (the other defaults: test_method_contract.py)."""
    out = {}
    for stand_in in (False, True):
        method = make("mwnet", seed=3, arch="mlp", collective=collective, normalise=True)  # no BN: halves == whole
        noisy, clean = _two_worker_data(rank, stand_in)
        for _ in range(2):
            method.step(noisy, clean)
        out[stand_in] = (flat(method.model.parameters()), flat(method.vnet.parameters()))
    return out


def test_two_workers_equal_one_worker_with_normalised_weights(tmp_path, float64_one_thread):
    ranks = run_two_ranks(_two_worker_results, tmp_path)
    single = _two_worker_results(-1, Collective())
    for key, value in single.items():
        for rank in ranks:
            for got, want in zip(rank[key], value):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")
    assert not torch.allclose(single[False][0], single[True][0])  # the stand-in's rows really are left out


# ---- config -------------------------------------------------------------------------------------------
def test_config_defaults_are_the_papers():
    ieg = ExperimentConfig().for_method("ieg").method
    assert (ieg.meta_stepsize, ieg.meta_momentum, ieg.mix_init, ieg.temperature, ieg.ce_factor,
            ieg.consistency_factor, ieg.mixup_beta, ieg.ema_decay) == (0.1, 0.9, 0.9, 0.5, 5.0, 20.0, 0.5, 0.999)
    mw = ExperimentConfig().for_method("mwnet").method
    assert (mw.meta_lr, mw.meta_weight_decay, mw.hidden_dim, mw.normalise) == (1e-3, 1e-4, 100, False)
    for name in NAMES:
        cfg = ExperimentConfig().for_method(name)
        assert ExperimentConfig.from_dict(cfg.to_dict()).method == cfg.method
