"""MLC and EMLC on real tiny torch models (no mocks, no Ray): meta-parameters move, soft labels are
distributions, fast == exact at k = 2 under both discounts, k-step cadence, stand-in batches and config
validation (fast == exact at k = 1, resume and two workers: test_method_contract.py).
That they beat ERM on noisy digits is tested end to end, on margins measured over 5 seeds (test_methods_e2e.py)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from metacorrect.config import ExperimentConfig
from metacorrect.methods import Batch
from students import flat, make_method, run_steps

C, SIDE, WIDTH = 10, 8, 4
META_METHODS = ("mlc", "emlc")



def make(name: str, seed: int = 0, **method):
    """A tiny small_cnn student + SGD (momentum, wd) + the method on one worker."""
    return make_method({"name": name, **method}, classes=C, side=SIDE, width=WIDTH, num_noisy=1000, seed=seed)


def batches(seed: int, steps: int, n: int = 16, m: int = 8, noisy_weight: float | None = None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        noisy = Batch(torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 1, SIDE, SIDE, generator=g),
                      torch.randint(0, C, (n,), generator=g), float(n) if noisy_weight is None else noisy_weight)
        clean = Batch(torch.arange(m), torch.randn(m, 1, SIDE, SIDE, generator=g),
                      torch.randint(0, C, (m,), generator=g), float(m))
        out.append((noisy, clean))
    return out


def meta_params(method) -> list[torch.Tensor]:
    return method.meta_params


run = run_steps


# ---- basics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", META_METHODS)
def test_steps_move_meta_parameters_and_soft_labels_are_distributions(name, float64_one_thread):
    method = make(name)
    before = flat(meta_params(method)).clone()
    student_before = flat(method.model.parameters()).clone()
    outs = run(method, batches(0, 4))
    assert not torch.equal(flat(meta_params(method)), before)
    assert not torch.equal(flat(method.model.parameters()), student_before)
    for out in outs:
        assert {"train_loss", "meta_loss", "clean_loss"} <= set(out)
        assert all(np.isfinite(v) for v in out.values())
    if name == "emlc":
        assert all(0.0 < out["gate_mean"] < 1.0 for out in outs)
    noisy = batches(1, 1, n=11)[0][0]
    for training in (True, False):
        method.model.train(training)
        q = method.soft_labels(noisy)
        assert q.shape == (11, C)
        assert torch.all(q >= 0)
        torch.testing.assert_close(q.sum(1), torch.ones(11))
    method.model.train()


def test_mlc_skip_connection(float64_one_thread):
    noisy = batches(2, 1)[0][0]
    fixed = make("mlc", skip=True, alpha=1.0)  # α = 1: the noisy label itself
    torch.testing.assert_close(fixed.soft_labels(noisy), torch.nn.functional.one_hot(noisy.label, C).double())
    learned = make("mlc", skip=True)  # per-sample α from an extra LCN output
    run(learned, batches(0, 2))
    torch.testing.assert_close(learned.soft_labels(noisy).sum(1), torch.ones(len(noisy)))


@pytest.mark.parametrize("name, discount", [("mlc", "projection"), ("mlc", "shrink"), ("mlc", "momentum"),
                                            ("emlc", "shrink"), ("emlc", "momentum")])
def test_fast_and_exact_give_the_same_k2_meta_update(name, discount, float64_one_thread):
    """k = 1 is in the contract suite; k = 2 under every discount here."""
    k = 2
    results = {}
    for mode in ("fast", "exact"):
        method = make(name, k=k, meta_grad=mode, discount=discount)
        run(method, batches(3, k))
        results[mode] = (flat(p.grad for p in meta_params(method)), flat(meta_params(method)))
    torch.testing.assert_close(results["fast"][0], results["exact"][0], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(results["fast"][1], results["exact"][1], rtol=1e-4, atol=1e-10)
    assert results["fast"][0].abs().max() > 0


@pytest.mark.parametrize("name", META_METHODS)
def test_k2_steps_the_meta_optimizer_every_second_step(name, float64_one_thread):
    method = make(name, k=2)
    history = [flat(meta_params(method)).clone()]
    outs = []
    for i, (noisy, clean) in enumerate(batches(4, 4)):
        torch.manual_seed(i)
        outs.append(method.step(noisy, clean))
        history.append(flat(meta_params(method)).clone())
    moved = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    if name == "emlc":  # EMLC: one teacher step per k real steps, the meta loss only then
        assert moved == [False, True, False, True]
        assert ["meta_loss" in o for o in outs] == [False, True, False, True]
    else:  # MLC: meta_backward after every step (γ-accumulation), the LCN steps every k calls
        assert moved == [False, True, False, True]
        assert all("meta_loss" in o for o in outs) and "meta_gamma" in outs[1]


# ---- stand-in batches ---------------------------------------------------------------------------------
def test_mlc_stand_in_noisy_batch_leaves_the_lcn_unchanged(float64_one_thread):
    method = make("mlc")
    before = flat(meta_params(method)).clone()
    out = run(method, batches(6, 1, noisy_weight=0.0))[0]
    assert torch.equal(flat(meta_params(method)), before)
    assert flat(p.grad for p in meta_params(method)).abs().max() == 0
    assert np.isfinite(out["meta_loss"])


@pytest.mark.parametrize("corruption", ["adversarial", "random"])
def test_emlc_stand_in_noisy_batch_contributes_nothing_to_the_teacher(corruption, float64_one_thread):
    """Only the teacher's clean terms (CE + BCE) act: two different stand-in batches give the same teacher,
    while a real noisy batch adds a meta term."""
    (stand_in_1, clean), = batches(7, 1, noisy_weight=0.0)
    (stand_in_2, _), = batches(8, 1, noisy_weight=0.0)
    real = Batch(stand_in_1.ids, stand_in_1.x, stand_in_1.label, float(len(stand_in_1)))
    after = []
    for noisy in (stand_in_1, stand_in_2, real):
        method = make("emlc", corruption=corruption)
        run(method, [(noisy, clean)])
        after.append(flat(meta_params(method)).clone())
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
    assert not torch.allclose(after[0], after[2])


# ---- config -------------------------------------------------------------------------------------------
def test_config_defaults_are_valid_and_round_trip():
    for name in META_METHODS:
        cfg = ExperimentConfig().for_method(name)
        assert cfg.method.name == name and cfg.method.validate() == []
        assert ExperimentConfig.from_dict(cfg.to_dict()).method == cfg.method
    problems = ExperimentConfig().for_method("mlc")
    assert problems.method.meta_lr == 3e-4 and problems.method.k == 1
