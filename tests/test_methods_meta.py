"""MLC and EMLC on real tiny torch models (no mocks, no Ray): meta-parameters move, soft labels are
distributions, fast == exact, k-step cadence, exact resume, stand-in batches and config validation.
That they beat ERM on noisy digits is tested end to end, on margins measured over 5 seeds (test_methods_e2e.py)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from metacorrect.config import ExperimentConfig
from metacorrect.methods import METHODS, Batch, MethodContext
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform.collective import Collective
from gloo import run_two_ranks
from students import make_method, restore

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


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def run(method, data, seed: int = 123) -> list[dict[str, float]]:
    outs = []
    for i, (noisy, clean) in enumerate(data):
        torch.manual_seed(seed + i)  # EMLC's random corruption draws from the global generator
        outs.append(method.step(noisy, clean))
    return outs


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


@pytest.mark.parametrize("name", META_METHODS)
@pytest.mark.parametrize("k", [1, 2])
def test_fast_and_exact_give_the_same_meta_update(name, k, float64_one_thread):
    results = {}
    for mode in ("fast", "exact"):
        method = make(name, k=k, meta_grad=mode)
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


@pytest.mark.parametrize("name,k", [("mlc", 1), ("mlc", 3), ("emlc", 1), ("emlc", 2)])
def test_resume_from_state_dict_is_exact(name, k, float64_one_thread):
    data = batches(5, 4)
    a = make(name, k=k)
    run(a, data[:3])  # k=2/3: the checkpoint falls between meta steps (snapshots / γ-accumulation pending)
    b = restore(a, make(name, seed=99, k=k))  # different initial weights: everything must come from the checkpoint
    for m in (a, b):
        torch.manual_seed(7)
        m.step(*data[3])
    torch.testing.assert_close(flat(meta_params(a)), flat(meta_params(b)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(a.model.parameters()), flat(b.model.parameters()), rtol=1e-12, atol=1e-14)


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


# ---- two workers --------------------------------------------------------------------------------------
def _two_worker_data(rank: int, stand_in: bool):
    """8 noisy + 8 clean rows split 4/4 over two ranks; rank -1: one worker holding what both hold.

    The single worker's clean batch is ordered [meta rows of rank 0, of rank 1, train rows of rank 0, of
    rank 1], so its halves are the union of the ranks' halves (and its every-other rows the same rows)."""
    g = torch.Generator().manual_seed(21)
    xn, yn = torch.randn(8, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (8,), generator=g)
    xc, yc = torch.randn(8, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (8,), generator=g)
    ids = torch.arange(8)
    if rank >= 0:
        r = slice(4 * rank, 4 * rank + 4)
        weight = 0.0 if stand_in and rank == 1 else 4.0
        return Batch(ids[r], xn[r], yn[r], weight), Batch(ids[r], xc[r], yc[r], 4.0)
    order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])
    n = 4 if stand_in else 8
    return Batch(ids[:n], xn[:n], yn[:n], float(n)), Batch(ids, xc[order], yc[order], 8.0)


def _two_worker_method(name: str, collective):
    cfg = ExperimentConfig.from_dict({"method": {"name": name}, "model": {"arch": "mlp", "width": 2}})
    torch.manual_seed(3)
    model = build_backbone("mlp", C, (SIDE, SIDE, 1), 2)  # no batch norm: halves == the whole batch
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return METHODS[name](MethodContext(cfg, model, opt, C, 8, collective))


def _two_worker_results(rank: int, collective) -> dict:
    out = {}
    for name in META_METHODS:
        for stand_in in (False, True):
            method = _two_worker_method(name, collective)
            for _ in range(2):
                method.step(*_two_worker_data(rank, stand_in))
            out[name, stand_in] = (flat(meta_params(method)), flat(method.model.parameters()))
    return out


def test_two_workers_equal_one_worker(tmp_path, float64_one_thread):
    """Rank 1 in a spawned process, rank 0 here (gloo, file rendezvous); with and without a stand-in batch."""
    ranks = run_two_ranks(_two_worker_results, tmp_path)
    single = _two_worker_results(-1, Collective())
    for name in META_METHODS:  # the stand-in's rows really are left out (not a vacuous comparison)
        assert not torch.allclose(single[name, False][0], single[name, True][0])
    for rank in ranks:
        for key, (meta, student) in single.items():
            torch.testing.assert_close(rank[key][0], meta, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")
            torch.testing.assert_close(rank[key][1], student, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")


# ---- config -------------------------------------------------------------------------------------------
def test_config_defaults_are_valid_and_round_trip():
    for name in META_METHODS:
        cfg = ExperimentConfig().for_method(name)
        assert cfg.method.name == name and cfg.method.validate() == []
        assert ExperimentConfig.from_dict(cfg.to_dict()).method == cfg.method
    problems = ExperimentConfig().for_method("mlc")
    assert problems.method.meta_lr == 3e-4 and problems.method.k == 1
