"""`train.precision: bf16` and `fp16` on CPU: every method trains a few steps under autocast, the meta passes
included, with finite results and fp32 parameters; the fast and exact meta-gradient paths still agree within
what the half precision's mantissa allows; and fp32 is exactly the arithmetic without any precision context.

fp16's loss scales (methods/engine/scaling.py): without autocast (float64) they change nothing, bit for bit;
an overflow skips the step it hit on every worker, is counted, lowers the scale that overflowed, and the next
steps go on; their state survives a checkpoint. Two fp16 workers in lockstep: tests/test_method_contract.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from metacorrect.methods import METHODS, Batch
from metacorrect.platform.precision import step_precision
from students import (flat, learned_state, low_loss_scales, make_method, noisy_and_clean, restore, run_fp16_steps,
                      run_steps)

C, SIDE, N, STEPS = 10, 8, 64, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and much faster on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
# Fields that make a method learn from its first step on tiny data (as in the contract suite).
FIELDS = {"mslg": {"warmup_epochs": 0, "label_lr": 50.0}, "soft_labels": {"label_lr": 20.0}}


def _data(method, seed: int = 0, n: int = 16, m: int = 8) -> list[tuple[Batch, Batch]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randperm(N, generator=g)[:n]
        views = torch.randn(method.strong_views, n, 1, SIDE, SIDE, generator=g) if method.strong_views else None
        noisy = Batch(ids, torch.randn(n, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (n,), generator=g),
                      float(n), views=views)
        clean = Batch(torch.arange(m), torch.randn(m, 1, SIDE, SIDE, generator=g),
                      torch.randint(0, C, (m,), generator=g), float(m))
        out.append((noisy, clean))
    return out


def _trained(name: str, precision: str | None, mode: str | None = None):
    """(parameters before, after STEPS steps, the last step's metrics, the method) of `name` on a tiny CNN
    student; fp16 from low loss scales (`students.low_loss_scales`)."""
    fields = {f.name for f in dataclasses.fields(METHODS[name].config_class)}
    method = make_method({"name": name} | ({"meta_grad": mode} if mode else {})
                         | ({"warmup_epochs": 0} if "warmup_epochs" in fields else {}),
                         classes=C, side=SIDE, width=4, num_noisy=N, precision=precision or "fp32")
    if precision == "fp16":
        low_loss_scales(method)
    weights = lambda: flat(method.model.parameters()).clone()  # noqa: E731
    before, out = weights(), {}
    for noisy, clean in _data(method):
        if precision is None:
            out = method.step(noisy, clean)
        else:
            with step_precision(precision, "cpu"):
                out = method.step(noisy, clean)
    assert all(p.dtype == torch.float32 for p in method.model.parameters()), "weights stay fp32"
    for state in method.state_dict().values():
        for t in state.values() if isinstance(state, dict) else [state]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                assert t.dtype in (torch.float32, torch.float64), f"{name}: method state {t.dtype}"
    return before, weights(), out, method


def _modes(name: str) -> list[str | None]:
    fields = {f.name for f in dataclasses.fields(METHODS[name].config_class)}
    return ["fast", "exact"] if "meta_grad" in fields else [None]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_trains_every_method_and_fast_agrees_with_exact(name):
    results = {mode: _trained(name, "bf16", mode) for mode in _modes(name)}
    before, fp32, _, _ = _trained(name, "fp32", _modes(name)[0])
    moved = float((fp32 - before).abs().max())
    assert moved > 1e-4, "the steps move the weights (else the comparisons are vacuous)"
    for mode, (_, after, out, _) in results.items():
        assert torch.isfinite(after).all() and all(torch.isfinite(torch.tensor(v)) for v in out.values()), mode
        # bf16 keeps ~3 significant digits. Measured on 2026-12-02 (largest weight difference / largest weight
        # change over the 3 steps): bf16 vs fp32 0.02-0.11 (IEG's sharpened pseudo labels the most), fast vs
        # exact under bf16 0-0.07; the bound is ~3x the largest.
        assert float((after - fp32).abs().max()) <= 0.3 * moved, (mode, float((after - fp32).abs().max()), moved)
    if len(results) == 2:
        gap = float((results["fast"][1] - results["exact"][1]).abs().max())
        assert gap <= 0.3 * moved, (gap, moved)


@pytest.mark.parametrize("name", ["mlc", "mslg", "ieg"])
def test_fp32_is_exactly_the_arithmetic_without_a_precision_context(name):
    for mode in _modes(name):
        plain, under_fp32 = _trained(name, None, mode)[1], _trained(name, "fp32", mode)[1]
        assert torch.equal(plain, under_fp32), mode
        assert not _trained(name, "fp32", mode)[3].loss_scales.enabled, "fp32 builds no loss scale"


# ---- fp16 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp16_trains_every_method_and_fast_agrees_with_exact(name):
    results = {mode: _trained(name, "fp16", mode) for mode in _modes(name)}
    before, fp32, _, _ = _trained(name, "fp32", _modes(name)[0])
    moved = float((fp32 - before).abs().max())
    for mode, (_, after, out, method) in results.items():
        assert torch.isfinite(after).all() and all(torch.isfinite(torch.tensor(v)) for v in out.values()), mode
        counts = method.loss_scales.metrics()
        assert counts["fp16_skipped_steps"] == counts["fp16_skipped_meta_steps"] == 0, (mode, counts)
        # fp16 keeps ~3.3 significant digits. Measured on 2026-12-05 (largest weight difference / largest weight
        # change over the 3 steps): fp16 vs fp32 0.001-0.05, fast vs exact under fp16 0-0.006; the bound is
        # ~3x the largest.
        assert float((after - fp32).abs().max()) <= 0.15 * moved, (mode, float((after - fp32).abs().max()), moved)
    if len(results) == 2:
        gap = float((results["fast"][1] - results["exact"][1]).abs().max())
        assert gap <= 0.15 * moved, (gap, moved)


def _float64_method(name: str, precision: str, **extra):
    """`name` as the contract suite builds it (float64 comes from the test's fixture)."""
    return make_method({"name": name, **FIELDS.get(name, {}), **extra}, classes=C, side=SIDE, width=4,
                       num_noisy=N, precision=precision)


@pytest.mark.parametrize("name, extra", [(n, {}) for n in sorted(METHODS)]
                         + [("mlc", {"k": 3}), ("emlc", {"k": 2}), ("mlc", {"meta_grad": "exact"}),
                            ("mwnet", {"normalise": True}), ("soft_labels", {"mode": "class", "label_lr": 0.5})])
def test_fp16_loss_scales_change_nothing_without_autocast(name, extra, float64_one_thread):
    """Every scale and unscale is by a power of two, so in float64 (where autocast casts nothing) a method with
    fp16's loss scales on learns bit for bit what it learns without them: nothing is left scaled anywhere."""
    data = noisy_and_clean(1, 4, classes=C, side=SIDE, num_noisy=N, views=1)
    states = {}
    for precision in ("fp32", "fp16"):
        method = _float64_method(name, precision, **extra)
        run_steps(method, data)
        states[precision] = learned_state(method)
    assert method.loss_scales.enabled and method.loss_scales.metrics()["fp16_skipped_meta_steps"] == 0
    assert torch.equal(states["fp16"], states["fp32"])


def _float32_fp16(name: str, seed: int = 0, **extra):
    """`name` on the tiny CNN in float32 with fp16's loss scales on, started low (`students.low_loss_scales`)."""
    method = make_method({"name": name, **FIELDS.get(name, {}), **extra}, classes=C, side=SIDE, width=4,
                         num_noisy=N, precision="fp16", seed=seed)
    low_loss_scales(method)
    return method


def _meta_state(method) -> torch.Tensor:
    """What a method's meta step updates: its meta-model, or its table's rows."""
    if getattr(method, "meta_params", None):
        return flat(method.meta_params).clone()
    return method.table.values.nan_to_num(-1.0).reshape(-1).clone()


def _overflow_at(method, part: str) -> None:
    """The next step of `part` ("real" or "meta") overflows: a scale of 2^40; its back-off goes to 2^10 at once."""
    state = method.loss_scales.state_dict()
    if part == "real":
        state["real"] |= {"scale": 2.0 ** 40, "backoff_factor": 2.0 ** -30}
    else:
        state["meta"]["grad"] |= {"value": 2.0 ** 40, "backoff_factor": 2.0 ** -30}
    method.loss_scales.load_state_dict(state)


@pytest.mark.parametrize("name", ["mlc", "emlc", "mslg", "mwnet", "l2rw", "ieg"])
def test_fp16_an_overflowed_meta_step_is_skipped_counted_and_backed_off(name):
    method = _float32_fp16(name)
    data = noisy_and_clean(3, 4, classes=C, side=SIDE, num_noisy=N, views=1)
    run_fp16_steps(method, data[:1])  # a first step: tables hold rows, meta-models have moved once
    _overflow_at(method, "meta")
    noisy = data[1][0]
    meta, student = _meta_state(method), flat(method.model.parameters()).clone()
    rows = method.table.read(noisy.ids, noisy.label) if method.table is not None else None
    run_fp16_steps(method, data[1:2])
    counts = method.loss_scales.metrics()
    assert counts["fp16_skipped_meta_steps"] == 1 and counts["fp16_meta_grad_scale"] == 2.0 ** 10, counts
    assert counts["fp16_skipped_steps"] == 0, "the real step goes on"
    assert not torch.equal(flat(method.model.parameters()), student)
    if name in ("l2rw", "ieg"):  # the weights fall back as for a zero weight sum
        assert bool((method.table.read(noisy.ids) == 0).all())
    elif name == "mslg":  # the step's label rows stay as they were
        assert torch.equal(method.table.read(noisy.ids, noisy.label), rows)
    else:
        assert torch.equal(_meta_state(method), meta), "the meta update is skipped"
    meta = _meta_state(method)
    run_fp16_steps(method, data[2:])
    assert method.loss_scales.metrics()["fp16_skipped_meta_steps"] == 1, "the next steps go on"
    assert not torch.equal(_meta_state(method), meta)
    other = restore(method, _float32_fp16(name, seed=5))
    assert other.loss_scales.state_dict() == method.loss_scales.state_dict()


@pytest.mark.parametrize("name", ["erm", "mlc"])
def test_fp16_an_overflowed_real_step_is_skipped_counted_and_backed_off(name):
    method = _float32_fp16(name)
    data = noisy_and_clean(4, 3, classes=C, side=SIDE, num_noisy=N, views=1)
    _overflow_at(method, "real")
    student, meta = flat(method.model.parameters()).clone(), _meta_state(method) if name == "mlc" else None
    run_fp16_steps(method, data[:1])
    counts = method.loss_scales.metrics()
    assert counts["fp16_skipped_steps"] == 1 and counts["fp16_loss_scale"] == 2.0 ** 10, counts
    assert torch.equal(flat(method.model.parameters()), student), "no optimizer step"
    if name == "mlc":  # a skipped real step is no look-ahead: no meta step either (and none counted as skipped)
        assert torch.equal(_meta_state(method), meta) and counts["fp16_skipped_meta_steps"] == 0
        assert not method.engine.snapshots
    run_fp16_steps(method, data[1:])
    assert method.loss_scales.metrics()["fp16_skipped_steps"] == 1, "the next steps go on"
    assert not torch.equal(flat(method.model.parameters()), student)
    if name == "mlc":
        assert not torch.equal(_meta_state(method), meta)


@pytest.mark.parametrize("name, extra", [("mlc", {"k": 3}), ("mslg", {}), ("mwnet", {})])
def test_fp16_resume_continues_bit_exact_with_the_loss_scales(name, extra):
    """A checkpoint between steps, after a skipped meta step (the scales and counts are not the defaults):
    the restored method continues bit for bit, its loss scales included."""
    data = noisy_and_clean(5, 5, classes=C, side=SIDE, num_noisy=N, views=1)
    a = _float32_fp16(name, **extra)
    run_fp16_steps(a, data[:1])
    _overflow_at(a, "meta")
    run_fp16_steps(a, data[1:3])
    assert a.loss_scales.metrics()["fp16_skipped_meta_steps"] == 1
    b = restore(a, _float32_fp16(name, seed=99, **extra))
    for method in (a, b):
        run_fp16_steps(method, data[3:], seed=7)
    assert torch.equal(learned_state(a), learned_state(b))
    assert a.loss_scales.state_dict() == b.loss_scales.state_dict()
