"""Sample table, MSLG and meta soft labels on real tiny torch models (no Ray): fast == exact for every variant
and architecture, class-level labels on two workers, parquet export, and the 1M-row table's in-place update
(resume and two workers for the default variants: test_method_contract.py)."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from metacorrect.methods import Batch
from metacorrect.methods.table import SampleTable, mass_logits, onehot_logits
from metacorrect.platform.collective import Collective
from gloo import run_two_ranks
from students import flat, make_method

C, SIDE, WIDTH, N = 10, 8, 4, 64
VARIANTS = {  # name -> method fields; warm-up off so every step learns labels
    "mslg": {"name": "mslg", "warmup_epochs": 0, "label_lr": 50.0},
    "mslg_fixed": {"name": "mslg", "warmup_epochs": 0, "label_lr": 50.0, "lookahead_lr": 0.5},
    "soft_instance": {"name": "soft_labels", "mode": "instance", "label_lr": 20.0, "p0": 0.7},
    "soft_instance_ent": {"name": "soft_labels", "mode": "instance", "label_lr": 20.0, "entropy_weighting": True},
    "soft_class": {"name": "soft_labels", "mode": "class", "label_lr": 1.0, "alpha_init": 0.2},
}


def make(variant: str, arch: str = "small_cnn", seed: int = 0, num_noisy: int = N, collective=None, **extra):
    return make_method(VARIANTS[variant] | extra, classes=C, side=SIDE, width=WIDTH, num_noisy=num_noisy, arch=arch,
                       seed=seed, collective=collective)


def data(seed: int, steps: int, n: int = 16, m: int = 8):
    """Batches over disjoint ids per step (as the platform deals them), ids revisited across steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        ids = torch.randperm(N, generator=g)[:n]
        noisy = Batch(ids, torch.randn(n, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (n,), generator=g), float(n))
        clean = Batch(torch.arange(m), torch.randn(m, 1, SIDE, SIDE, generator=g),
                      torch.randint(0, C, (m,), generator=g), float(m))
        out.append((noisy, clean))
    return out


def labels_of(method) -> torch.Tensor:
    return (method.alpha if getattr(method, "alpha", None) is not None else method.table.values).detach().clone()


@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_meta_gradient_equals_exact(variant, arch, float64_one_thread):
    fast, exact = make(variant, arch), make(variant, arch, meta_grad="exact")
    before = {n: b.clone() for n, b in fast.model.named_buffers()}
    steps = data(1, 3)
    for noisy, clean in steps:
        out_fast, out_exact = fast.step(noisy, clean), exact.step(noisy, clean)
        assert out_fast["meta_loss"] == pytest.approx(out_exact["meta_loss"], rel=1e-10)
    moved = labels_of(fast) - labels_of(make(variant, arch))
    assert moved.abs().max() > 1e-6, "labels must move (otherwise the comparison is vacuous)"
    torch.testing.assert_close(labels_of(fast), labels_of(exact), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(flat(fast.model.parameters()), flat(exact.model.parameters()), rtol=1e-6, atol=1e-10)
    # BN running stats: only the 3 real forwards moved them, identically on both paths.
    for n, b in fast.model.named_buffers():
        torch.testing.assert_close(b, dict(exact.model.named_buffers())[n])
    if arch == "small_cnn":
        assert int(dict(fast.model.named_buffers())["body.1.num_batches_tracked"]) == 3
        assert not torch.equal(before["body.1.running_mean"], dict(fast.model.named_buffers())["body.1.running_mean"])


def test_mslg_initial_labels_and_warmup(float64_one_thread):
    method = make("mslg", warmup_epochs=1, logit_scale=10.0)
    noisy, clean = data(2, 1)[0]
    q = method.soft_labels(noisy)
    assert torch.allclose(q.argmax(1), noisy.label)
    assert q.max(1).values.min() == pytest.approx(torch.softmax(torch.tensor([10.0] + [0.0] * 9), 0)[0].item())
    method.start_epoch(0)  # warm-up: plain CE, the table stays untouched
    method.step(noisy, clean)
    assert not method.table.seen.any()
    method.start_epoch(1)
    out = method.step(noisy, clean)
    assert method.table.seen.sum() == len(noisy) and "meta_loss" in out


def test_soft_instance_labels_start_at_p0(float64_one_thread):
    method = make("soft_instance", p0=0.7)
    noisy, _ = data(3, 1)[0]
    q = method.soft_labels(noisy)
    torch.testing.assert_close(q.sum(1), torch.ones(len(noisy), dtype=q.dtype))
    assert torch.allclose(q.gather(1, noisy.label[:, None]).squeeze(1), torch.full((len(noisy),), 0.7, dtype=q.dtype))
    class_method = make("soft_class", alpha_init=0.0)
    assert torch.allclose(class_method.soft_labels(noisy).argmax(1), noisy.label)  # α = 0: one-hot


def test_stand_in_batches_leave_the_table_alone(float64_one_thread):
    method = make("mslg")
    noisy, clean = data(4, 1)[0]
    stand_in = Batch(clean.ids, clean.x, clean.label, 0.0)  # the platform's weight-0 filler (clean ids!)
    method.step(stand_in, clean)
    assert not method.table.seen.any()


def test_exported_table_has_one_row_per_id(float64_one_thread):
    method = make("soft_instance")
    for s in data(6, 8):
        method.step(*s)
    files = method.export_files()
    table = pq.read_table(io.BytesIO(files["label_table.parquet"])).to_pandas()
    assert list(table["id"]) == list(range(N))
    assert {"id", "noisy_label", "top1_label", "top1_prob", "top3_prob", "argmax", "entropy"} <= set(table.columns)
    seen = method.table.seen.numpy()
    assert (table["argmax"][seen] == method.table.values[seen].argmax(1).numpy()).all()
    assert (table["argmax"][~seen] == -1).all() and table["entropy"][~seen].isna().all()
    assert table["entropy"][seen].between(0, torch.log(torch.tensor(float(C))).item() + 1e-6).all()
    assert make("soft_class").export_files() == {}


# ---- two workers ------------------------------------------------------------------------------------------
TWO_WORKER_VARIANTS = ("soft_class",)  # mslg and instance soft labels: test_method_contract.py


def _global_steps(steps: int = 3):
    """Global batches of 8 noisy rows (disjoint ids within a step) and 8 clean rows."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        ids = torch.randperm(N, generator=g)[:8]
        out.append((ids, torch.randn(8, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (8,), generator=g),
                    torch.randn(8, 1, SIDE, SIDE, generator=g), torch.randint(0, C, (8,), generator=g)))
    return out


def _two_worker_results(rank: int, collective) -> dict:
    out = {}
    for variant in TWO_WORKER_VARIANTS:
        method = make(variant, "mlp", seed=3, collective=collective)  # no BN: halves == the whole batch
        for ids, xn, yn, xc, yc in _global_steps():
            if rank < 0:
                noisy, clean = Batch(ids, xn, yn, 8.0), Batch(torch.arange(8), xc, yc, 8.0)
            else:
                r = slice(4 * rank, 4 * rank + 4)
                noisy, clean = Batch(ids[r], xn[r], yn[r], 4.0), Batch(torch.arange(8)[r], xc[r], yc[r], 4.0)
            method.step(noisy, clean)
        out[variant] = (labels_of(method), flat(method.model.parameters()))
    return out


def test_two_workers_hold_identical_tables_equal_to_one_worker(tmp_path, float64_one_thread):
    rank0, rank1 = run_two_ranks(_two_worker_results, tmp_path)
    single = _two_worker_results(-1, Collective())
    for variant in TWO_WORKER_VARIANTS:
        assert torch.equal(rank0[variant][0], rank1[variant][0]), f"{variant}: replicas differ"
        assert labels_of(make(variant, "mlp", seed=3)).ne(single[variant][0]).any(), variant
        torch.testing.assert_close(rank0[variant][0], single[variant][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(rank0[variant][1], single[variant][1], rtol=1e-9, atol=1e-12)


# ---- the Clothing1M-size table ------------------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import torch
    from metacorrect.methods.table import SampleTable, onehot_logits
    from metacorrect.platform.collective import Collective
    def reset_peak():  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    def peak_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    table = SampleTable("labels", 1_000_000, Collective(), num_classes=14, init_row=onehot_logits(10.0))
    table.values.fill_(0.5)  # touch every page
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(1_000_000, generator=g)[:1024]
    labels = torch.randint(0, 14, (1024,), generator=g)
    ptr = table.values.data_ptr()
    rows = table.read(ids, labels)
    new_rows = rows + 1.0
    reset_peak()
    base = peak_mib()
    table.write(ids, new_rows, labels)
    update_growth = peak_mib() - base
    assert table.values.data_ptr() == ptr
    assert torch.equal(table.values[ids], rows + 1.0) and int(table.seen.sum()) == 1024
    reset_peak()
    base = peak_mib()
    copy = table.values.clone()  # the control: what a second full copy costs
    copy.add_(1.0)
    print(update_growth, peak_mib() - base)
""")


def test_million_row_table_updates_in_place():
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    update_growth, copy_growth = map(float, out.stdout.split())
    full = 1_000_000 * 14 * 4 / 2**20  # 53.4 MiB
    assert copy_growth > 0.8 * full, (copy_growth, "the measurement must see a full copy")
    assert update_growth < 0.1 * full, (update_growth, "a row update must not allocate a table-sized copy")


def test_table_rejects_bad_ids_and_shapes():
    table = SampleTable("labels", 10, Collective(), num_classes=3, init_row=mass_logits(0.5))
    with pytest.raises(IndexError, match=r"ids must be in \[0, 10\)"):
        table.read(torch.tensor([3, 10]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows have shape"):
        table.write(torch.tensor([1]), torch.zeros(2, 3), torch.tensor([0]))
    other = SampleTable("labels", 11, Collective(), num_classes=3, init_row=onehot_logits(1.0))
    with pytest.raises(ValueError, match="a different data set"):
        other.load_state_dict(table.state_dict())
