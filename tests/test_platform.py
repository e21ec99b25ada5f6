"""The data path of a multi-worker run on a real local Ray cluster and the loop in the driver (local mode), fp16's
loss scales through that loop.

Two-worker runs of every method and their MLflow records: test_workers_e2e.py; resume after a stopped or
killed driver or worker: test_faults.py."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _collect_ids_loop(config):
    """A Train loop that streams the noisy split exactly as the platform's loop does and records ids."""
    import ray.train
    import ray.train.torch

    from metacorrect.datasets.contract import read_meta
    from metacorrect.platform.batches import empty_rows, iterate
    from metacorrect.platform.collective import Collective
    from metacorrect.platform.global_batches import global_batches

    device = ray.train.torch.get_device()
    collective = Collective.from_process_group(device)
    meta = read_meta(config["data_dir"])
    shard = ray.train.get_dataset_shard("noisy")
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(2):
        stream = iterate(shard, 24, device, shuffle_buffer=256, seed=epoch)
        ids, sizes = [], []
        for rows in global_batches(stream, 48, collective, empty_rows(meta, device)):
            sizes.append(0 if rows is None else len(rows["id"]))
            if rows is not None:
                ids.append(rows["id"].cpu().numpy())
        np.save(Path(config["out"]) / f"epoch{epoch}-rank{rank}.npy", np.concatenate(ids) if ids else np.zeros(0))
        np.save(Path(config["out"]) / f"epoch{epoch}-rank{rank}-sizes.npy", np.array(sizes))
        ray.train.report({"epoch": epoch})


def test_two_workers_see_every_noisy_id_once_per_epoch(ray_cluster, digits_noisy, tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from metacorrect.datasets.contract import read_meta
    from metacorrect.datasets.stream import open_split
    from metacorrect.platform.data_config import ExactSplitDataConfig

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    meta = read_meta(digits_noisy)
    trainer = TorchTrainer(
        _collect_ids_loop, train_loop_config={"data_dir": str(digits_noisy), "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"noisy": open_split(digits_noisy, "noisy_train", meta, shuffle_files=True)},
        dataset_config=ExactSplitDataConfig(["noisy"]),
        run_config=ray.train.RunConfig(name="ids", storage_path=str(tmp_path / "runs")))
    trainer.fit()
    n = meta.counts["noisy_train"]
    for epoch in range(2):
        parts = [np.load(tmp_path / f"epoch{epoch}-rank{r}.npy") for r in range(2)]
        seen = np.concatenate(parts)
        assert len(seen) == n, "every noisy row is delivered (none dropped to even out the shards)"
        assert len(np.unique(seen)) == n, "no noisy id is delivered twice"
        assert set(seen.tolist()) == set(range(n))
        assert all(len(p) > 0 for p in parts), "both workers get a share of the noisy stream"
        sizes = [np.load(tmp_path / f"epoch{epoch}-rank{r}-sizes.npy") for r in range(2)]
        assert len(sizes[0]) == len(sizes[1]), "workers take the same number of steps, whatever their shard sizes"
        assert (sizes[0] + sizes[1]).tolist() == [48] * (n // 48) + [n % 48], "the global batches of one worker"


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
