"""The data path of a multi-worker run on a real local Ray cluster and the loop in the driver (local mode), fp16's
loss scales through that loop.

Two-worker runs of every method and their MLflow records: test_workers_e2e.py; resume after a stopped or
killed driver or worker: test_faults.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_two_workers_see_every_noisy_id_once_per_epoch_in_the_global_batches_of_one(cli_run_two_workers_streamed):
    """The noisy split streamed to two Ray Train workers (conftest's CLI run: mlc, batch 64, 2 epochs), read from
    the ids each rank traced per step: every row each epoch, none twice, both workers a share, the same steps on
    both, and together the global batches one worker would take."""
    _, trace = cli_run_two_workers_streamed
    files = sorted(trace.glob("ids-rank*-pid*.jsonl"))
    assert [f.name.split("-")[1] for f in files] == ["rank0", "rank1"], "one attempt, one file per rank"
    ranks = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    n = 1138
    for epoch in (0, 1):
        zero, one = ([line for line in lines if line["epoch"] == epoch] for lines in ranks)
        seen = [i for line in zero + one for i in line["ids"]]
        assert sorted(seen) == list(range(n)), "every noisy row is delivered once (none dropped to even out shards)"
        assert any(line["ids"] for line in zero) and any(line["ids"] for line in one), "both workers get a share"
        assert [line["step"] for line in zero] == [line["step"] for line in one], "the same steps on both workers"
        assert [len(a["ids"]) + len(b["ids"]) for a, b in zip(zero, one)] == [64] * (n // 64) + [n % 64], \
            "the global batches of one worker"


@pytest.mark.parametrize("cache_mb", [None, 0], ids=["cached", "streamed"])
def test_local_mode_runs_in_the_driver_and_keeps_its_checkpoint(ray_cluster, digits_noisy, experiment, cache_mb):
    """Without Ray Train: cached splits and (`data.cache_mb: 0`) streamed ones reach the loop whole."""
    from metacorrect.methods.backbones import build_backbone
    from metacorrect.platform.trainer import run

    extra = {} if cache_mb is None else {"data__cache_mb": cache_mb, "tracking__run_name": "local-streamed"}
    result = run(experiment(digits_noisy, resources__num_workers=0, train__epochs=1, **extra), progress=False)
    model_file = Path(result.checkpoint_path) / "model.pt"
    assert model_file.is_file(), "num_workers=0: Ray does not copy checkpoints, so ours must stay on disk"
    model = build_backbone("small_cnn", 10, (8, 8, 1), width=16)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    assert result.metrics["noisy_rows_seen"] == 1138
    assert 0.0 < result.metrics["test_accuracy"] <= 1.0 and result.metrics["val_accuracy"] > 0.0


def test_local_mode_fp16_logs_its_skip_counts_and_resumes_with_its_loss_scales(ray_cluster, digits_noisy,
                                                                                experiment):
    """fp16 through the platform's loop (in the driver): the loss scales' skip counts and scales are epoch and
    step metrics, every logged step metric is finite, the checkpoint holds the scales, and a resumed run
    continues with them (its counts and GradScaler's growth tracker go on from the checkpoint's)."""
    import math

    from metacorrect.platform.checkpoint import load_state
    from metacorrect.platform.trainer import run

    cfg = experiment(digits_noisy, resources__num_workers=0, train__epochs=1, train__precision="fp16",
                     train__log_every=4, model__width=8, method__name="mslg", method__warmup_epochs=0,
                     tracking__run_name="fp16-local")
    first = run(cfg, progress=False)
    keys = {"fp16_skipped_steps", "fp16_skipped_meta_steps", "fp16_loss_scale", "fp16_meta_grad_scale",
            "fp16_meta_tangent_scale"}
    assert keys <= set(first.metrics)
    state = load_state(first.checkpoint_path)
    scales = state["loss_scales"]
    assert (scales["skipped_real"], scales["meta"]["skipped"]) == \
        (first.metrics["fp16_skipped_steps"], first.metrics["fp16_skipped_meta_steps"])
    rows = state["step_history"]
    assert rows and all({f"step/{k}" for k in keys} <= set(r) for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    steps = int(first.metrics["steps"])
    second = run(cfg.with_overrides(["train.epochs=2"]), progress=False)
    after = load_state(second.checkpoint_path)["loss_scales"]
    assert after["skipped_real"] >= scales["skipped_real"] and after["meta"]["skipped"] >= scales["meta"]["skipped"]
    if after["skipped_real"] == scales["skipped_real"]:  # no overflow in epoch 2: the tracker carried on
        assert after["real"]["_growth_tracker"] == scales["real"]["_growth_tracker"] + steps
