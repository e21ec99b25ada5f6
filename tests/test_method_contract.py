"""The contract every registered method passes, on real tiny torch models (no mocks, no Ray):

- fast == exact: with `meta_grad` fast and exact (k = 1) the method learns the same (float64);
- resume: a method restored from a serialised checkpoint between steps continues bit for bit;
- two gloo workers == one worker holding both halves, and a stand-in batch (weight 0) on one worker leaves
  its rows out exactly; under fp16 (one method of each kind of meta update, in the same two processes) the
  replicas stay identical and an overflow on one worker skips the step on both.

What is special to a method (its references, its options) is in its own test file.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from metacorrect.methods import METHODS, Batch
from metacorrect.platform.collective import Collective
from gloo import run_two_ranks
from students import learned_state, low_loss_scales, make_method, noisy_and_clean, restore, run_fp16_steps, run_steps

C, SIDE, WIDTH, N = 10, 8, 4, 64
# Fields that make a method learn from its first step on tiny data (warm-up off, label steps that move labels).
FIELDS = {"mslg": {"warmup_epochs": 0, "label_lr": 50.0}, "soft_labels": {"label_lr": 20.0}}
RESUME_K = {"mlc": 3, "emlc": 2}  # resume between meta steps: snapshots / MLC's accumulation pending
NAMES = sorted(METHODS)
META_NAMES = [n for n in NAMES if "meta_grad" in {f.name for f in dataclasses.fields(METHODS[n].config_class)}]
# Methods with `mix_clean` also pass the contract with it switched from its default (half of each clean batch
# then trains the student, the other half is the meta batch).
MIXES = {n: not f.default for n in NAMES for f in dataclasses.fields(METHODS[n].config_class) if f.name == "mix_clean"}


@pytest.fixture(autouse=True)
def _float64(float64_one_thread):
    yield


def make(name: str, arch: str = "small_cnn", seed: int = 0, collective=None, precision: str = "fp32", **extra):
    return make_method({"name": name, **FIELDS.get(name, {}), **extra}, classes=C, side=SIDE, width=WIDTH,
                       num_noisy=N, arch=arch, seed=seed, collective=collective, precision=precision)


def data(seed: int, steps: int):
    return noisy_and_clean(seed, steps, classes=C, side=SIDE, num_noisy=N, views=1)


def test_every_method_is_in_the_contract():
    assert set(META_NAMES) == set(NAMES) - {"erm", "clean_only"}


def test_mix_clean_is_offered_by_every_method_that_learns_from_a_look_ahead():
    assert set(MIXES) == set(META_NAMES) - {"ieg"}  # IEG's loss has its own clean term (Algorithm 1)


@pytest.mark.parametrize("name,extra", [(n, {}) for n in META_NAMES] + [(n, {"mix_clean": m}) for n, m in MIXES.items()],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_fast_equals_exact_at_k1(name, extra):
    states = {}
    for mode in ("fast", "exact"):
        method = make(name, meta_grad=mode, **extra)
        run_steps(method, data(1, 3))
        states[mode] = learned_state(method)
    torch.testing.assert_close(states["fast"], states["exact"], rtol=1e-7, atol=1e-10)
    assert not torch.equal(states["fast"], learned_state(make(name, **extra)))


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(name):
    extra = {"k": RESUME_K[name]} if name in RESUME_K else {}
    steps = data(2, 5)
    a = make(name, **extra)
    run_steps(a, steps[:3])
    b = restore(a, make(name, seed=99, **extra))  # other initial weights: everything must come from the checkpoint
    for method in (a, b):
        run_steps(method, steps[3:], seed=7)
    assert torch.equal(learned_state(a), learned_state(b))


# ---- two workers ------------------------------------------------------------------------------------------
def _halves(rank: int, stand_in: bool, name: str) -> tuple[Batch, Batch]:
    """8 noisy + 8 clean rows split 4/4 over two ranks (rank 1's noisy batch a stand-in if asked); rank -1: one
    worker holding what counts of both. The single worker's clean batch is ordered [first halves of rank 0 and 1,
    second halves of rank 0 and 1], so a method that splits its clean batch in halves (MLC, EMLC's mix) or takes
    every other row (EMLC's gate) sees the same rows."""
    (noisy, _), = noisy_and_clean(21, 1, classes=C, side=SIDE, num_noisy=N, n=8, views=1)
    (_, clean), = noisy_and_clean(22, 1, classes=C, side=SIDE, num_noisy=N, m=8)
    if rank >= 0:
        r = slice(4 * rank, 4 * rank + 4)
        weight = 0.0 if stand_in and rank == 1 else 4.0
        return (Batch(noisy.ids[r], noisy.x[r], noisy.label[r], weight, views=noisy.views[:, r]),
                Batch(clean.ids[r], clean.x[r], clean.label[r], 4.0))
    n = 4 if stand_in else 8
    order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])
    if stand_in and name == "clean_only":  # the noisy stream paces clean_only: a stand-in step trains on nothing
        order = torch.arange(4)
    return (Batch(noisy.ids[:n], noisy.x[:n], noisy.label[:n], float(n), views=noisy.views[:, :n]),
            Batch(clean.ids[order], clean.x[order], clean.label[order], float(len(order))))


def _ieg_coefficients(method, rank: int, stand_in: bool) -> torch.Tensor:
    """IEG's MixUp draws and logit_norm are per worker by design: its meta-gradients (the data coefficients,
    from the whole batch's pseudo labels) are what must not depend on the worker count."""
    from metacorrect.methods.ieg import pseudo_labels

    noisy, clean = _halves(rank, stand_in, "ieg")
    whole, _ = _halves(-1, False, "ieg")
    guess = pseudo_labels([method.model(whole.x), method.model(whole.views[0])])
    guess = guess[4 * rank:4 * rank + 4] if rank >= 0 else guess[:len(noisy)]
    co = method.data_coefficients(noisy, clean, guess)
    return torch.stack([co.grad_weight, co.weight, co.mix])


# fp16: one of each kind of meta update (a meta-model through the engine, a label table, a meta-model the method
# steps, normalised weights); IEG's MixUp is per worker by design.
FP16_NAMES = ["mlc", "mslg", "mwnet", "l2rw"]


def _fp16_results(rank: int, collective) -> dict:
    """Per method: (learned state, loss scales) after two fp16 steps, and after a third in which the noisy rows
    of rank 1 overflow float16 (×1e5). float32: the gloo ranks default to float64, which autocast leaves alone."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        out = {}
        for name in FP16_NAMES:
            method = make(name, arch="mlp", seed=3, collective=collective, precision="fp16")
            low_loss_scales(method)
            for step in range(3):
                noisy, clean = _halves(rank, False, name)
                if step == 2:
                    noisy.x[slice(4, 8) if rank < 0 else slice(0, 4) if rank == 1 else slice(0, 0)] *= 1e5
                run_fp16_steps(method, [(noisy, clean)], seed=11 + step)
                if step >= 1:
                    out[name, step] = (learned_state(method), method.loss_scales.state_dict())
        return out
    finally:
        torch.set_default_dtype(dtype)


VARIANTS = [(n, ()) for n in NAMES] + [(n, (("mix_clean", m),)) for n, m in MIXES.items()]


def _two_worker_results(rank: int, collective) -> dict:
    out = {"fp16": _fp16_results(rank, collective)}
    for name, extra in VARIANTS:
        for stand_in in (False, True):
            # no batch norm: halves == the whole
            method = make(name, arch="mlp", seed=3, collective=collective, **dict(extra))
            if name == "ieg":
                out[name, extra, stand_in] = _ieg_coefficients(method, rank, stand_in)
                continue
            for _ in range(2):
                method.step(*_halves(rank, stand_in, name))
            out[name, extra, stand_in] = learned_state(method)
    return out


def test_two_workers_equal_one_worker_and_stand_ins_count_for_nothing(tmp_path):
    """Rank 1 in a spawned process, rank 0 here (gloo, file rendezvous)."""
    ranks = run_two_ranks(_two_worker_results, tmp_path)
    single = _two_worker_results(-1, Collective())
    for name, extra in VARIANTS:
        whole, left_out = single[name, extra, False], single[name, extra, True]
        if name == "ieg":  # the first four rows' coefficients, with and without the other four in the look-ahead
            whole = whole[:, :4]
        assert not torch.allclose(whole, left_out), f"{name}: stand-in rows not left out"
        for stand_in in (False, True):
            want = single[name, extra, stand_in]
            if name == "ieg":  # each rank holds its rows of the whole batch's coefficients
                parts = [ranks[0][name, extra, stand_in]] + ([] if stand_in else [ranks[1][name, extra, stand_in]])
                got = [torch.cat(parts, dim=1)]
            else:
                got = [rank[name, extra, stand_in] for rank in ranks]
                assert torch.equal(got[0], got[1]), f"{name} {extra}: replicas differ"
            for g in got:
                torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"{name} {extra}, {stand_in}: {m}")
    ranks, single = [r["fp16"] for r in ranks], single["fp16"]
    for name in FP16_NAMES:
        for step in (1, 2):
            (a, scales_a), (b, scales_b) = ranks[0][name, step], ranks[1][name, step]
            want, scales = single[name, step]
            assert torch.equal(a, b), f"fp16 {name}: replicas differ after step {step}"
            assert scales_a == scales_b == scales, f"fp16 {name}: loss scales differ after step {step}"
            # float16 on halves vs on the whole batch: the same sums in another order.
            torch.testing.assert_close(a, want, rtol=1e-2, atol=1e-3, msg=lambda m: f"fp16 {name}, {step}: {m}")
        # The overflow skips the real step, and the meta step with it (MLC's follows the skipped real step: it had
        # no look-ahead to take, so none was counted).
        counts = (single[name, 2][1]["skipped_real"], single[name, 2][1]["meta"]["skipped"])
        assert counts == (1, 0 if name == "mlc" else 1), (name, counts)
