"""End-to-end runs on a real local Ray cluster, real parquet data and a real MLflow SQLite store."""
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
    from metacorrect.platform.trainer import ExactSplitDataConfig

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


def test_erm_reaches_90_percent_on_clean_digits(ray_cluster, digits_clean, experiment):
    from metacorrect.platform.trainer import run

    cfg = experiment(digits_clean, train__epochs=5, optim__lr=0.05)
    result = run(cfg, progress=False)
    assert result.metrics["epoch"] == 5
    assert result.metrics["test_accuracy"] >= 0.90, result.metrics
    assert result.metrics["noisy_rows_seen"] == 1138 + 0  # the whole noisy split, each epoch
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]


def test_noisy_digits_erm_and_clean_only_run_and_log_to_mlflow(ray_cluster, digits_noisy, experiment):
    from mlflow.tracking import MlflowClient

    from metacorrect.platform.trainer import run

    results = {m: run(experiment(digits_noisy, method__name=m), progress=False) for m in ("erm", "clean_only")}
    for method, result in results.items():
        client = MlflowClient(tracking_uri=result.tracking_uri)  # a fresh client on the same store
        mlrun = client.get_run(result.mlflow_run_id)
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.params["method.name"] == method
        assert mlrun.data.params["data.prepare.noise"] == "symmetric:0.6"
        assert float(mlrun.data.params["data.actual_noise_rate"]) == pytest.approx(0.6, abs=0.05)
        history = client.get_metric_history(result.mlflow_run_id, "test_accuracy")
        assert [m.step for m in history] == [1, 2]
        for key in ("train_loss", "val_accuracy", "noisy_recovery", "noisy_memorised_corrupted"):
            assert len(client.get_metric_history(result.mlflow_run_id, key)) == 2, key
        artifacts = _artifact_sizes(client, result.mlflow_run_id)
        for name in ("plots/noise_transition.png", "plots/learning_curves.png", "config.yaml", "model/model.pt",
                     "data/meta.json"):
            assert artifacts.get(name, 0) > 0, f"{name} missing or empty in {sorted(artifacts)}"
        assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert results["erm"].mlflow_run_id != results["clean_only"].mlflow_run_id


def _artifact_sizes(client, run_id, path=None) -> dict[str, int]:
    out = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= _artifact_sizes(client, run_id, item.path)
        else:
            out[item.path] = item.file_size or 0
    return out


def test_resume_continues_at_next_epoch_with_the_same_state(ray_cluster, digits_noisy, experiment):
    """A run stopped after epoch 1 and started again equals an uninterrupted run (one worker, seeded)."""
    from mlflow.tracking import MlflowClient

    from metacorrect.platform import checkpoint as ckpt
    from metacorrect.platform.trainer import run

    common = dict(resources__num_workers=1, optim__schedule="constant", data__deterministic="true")
    first = run(experiment(digits_noisy, train__epochs=1, tracking__run_name="resume-me", **common), progress=False)
    assert first.metrics["epoch"] == 1
    resumed = run(experiment(digits_noisy, train__epochs=2, tracking__run_name="resume-me", **common), progress=False)
    straight = run(experiment(digits_noisy, train__epochs=2, tracking__run_name="straight", **common), progress=False)

    assert resumed.mlflow_run_id == first.mlflow_run_id, "resuming appends to the same MLflow run"
    steps = [m.step for m in MlflowClient(resumed.tracking_uri).get_metric_history(resumed.mlflow_run_id, "val_accuracy")]
    assert steps == [1, 2], "epoch 1 from the first start, epoch 2 from the resumed one; nothing repeated"

    a, b = ckpt.load_state(resumed.checkpoint_path), ckpt.load_state(straight.checkpoint_path)
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][key], msg=f"model.{key} differs after resume")
    for pid, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])


def test_local_mode_runs_in_the_driver_and_keeps_its_checkpoint(ray_cluster, digits_noisy, experiment):
    from metacorrect.methods.backbones import build_backbone
    from metacorrect.platform.trainer import run

    result = run(experiment(digits_noisy, resources__num_workers=0, train__epochs=1), progress=False)
    model_file = Path(result.checkpoint_path) / "model.pt"
    assert model_file.is_file(), "num_workers=0: Ray does not copy checkpoints, so ours must stay on disk"
    model = build_backbone("small_cnn", 10, (8, 8, 1), width=16)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    assert result.metrics["noisy_rows_seen"] == 1138
