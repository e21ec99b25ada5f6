"""Step checkpoints (`train.checkpoint_every`) and step metrics (`train.log_every`), with real processes: a
driver stopped by SIGTERM, and a Ray Train worker SIGKILLed by pid (conftest's erm run, shared with the other
fault and two-worker tests), in the middle of an epoch. The run resumes inside the epoch, every noisy id of that
epoch is trained on exactly once across the interruption (read from `train.trace_ids_dir`, the ids each step
trained on), and with one worker and `data.deterministic: true` the final weights and label table equal an
uninterrupted run's. That runs leave nothing running is checked after the many runs of test_workers_e2e.py."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from procs import start_and_signal
from run_dirs import committed, mid_epoch_committed

pytestmark = pytest.mark.slow

NOISY_ROWS = 1138
# The stop is sent once the first step checkpoint inside epoch 2 is committed (global step 80) and must land
# before that epoch ends (step 144), or the run resumes from the epoch's end instead of inside it: 64 steps of
# room. At batch 32 (36 steps an epoch, 32 of room) a loaded box's stop sometimes took longer than the steps.
BATCH = 16  # 72 steps an epoch
EVERY = 10
LOG_EVERY = 4
EPOCHS = 3  # stopped inside the second; the third leaves the stop room to land before the run ends


def _sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def _attempts(trace_dir: Path) -> list[list[dict]]:
    """The trace lines of each attempt (a set of worker processes), in the order the attempts started."""
    by_pid: dict[int, list[dict]] = {}
    for f in trace_dir.glob("ids-rank*-pid*.jsonl"):
        by_pid[int(f.stem.split("pid")[1])] = [json.loads(line) for line in f.read_text().splitlines()]
    starts = sorted((lines[0]["step"], pid) for pid, lines in by_pid.items() if lines)
    attempts: dict[int, list[dict]] = {}
    for first_step, pid in starts:  # workers of one attempt start at the same step
        attempts.setdefault(first_step, []).extend(by_pid[pid])
    return [attempts[k] for k in sorted(attempts)]


def _ids_of_interrupted_epoch(trace_dir: Path) -> tuple[int, int, list[int]]:
    """(epoch, step resumed after, the ids that epoch trained on: the first attempt's up to the step the
    second resumed from, then the second's)."""
    first, second = _attempts(trace_dir)
    resumed_after = min(line["step"] for line in second) - 1
    epoch = min(line["epoch"] for line in second)
    ids = [i for line in first if line["epoch"] == epoch and line["step"] <= resumed_after for i in line["ids"]]
    ids += [i for line in second if line["epoch"] == epoch for i in line["ids"]]
    return epoch, resumed_after, ids


def _step_history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _common(data: Path, tmp_path: Path) -> list[str]:
    return [f"data.path={data}", f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}", "model.width=8",
            f"train.checkpoint_every={EVERY}", f"train.log_every={LOG_EVERY}", "data.deterministic=true",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
            "tracking.experiment=step-checkpoints", "method.warmup_epochs=1", "method.label_lr=20000"]


def test_a_driver_stopped_mid_epoch_resumes_inside_it_each_id_once_and_ends_as_an_uninterrupted_run(
        ray_cluster, digits_noisy, tmp_path):
    """SIGTERM (a scheduler's stop; Ctrl-C takes the same handler on Ray Train) once a step checkpoint inside
    epoch 2 is committed: exit status 143 and the MLflow run KILLED; the same name resumes inside the epoch."""
    from mlflow.tracking import MlflowClient

    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    trace = tmp_path / "trace"
    sets = _common(digits_noisy, tmp_path) + ["resources.num_workers=1", "resources.cpus_per_worker=1",
                                               f"train.trace_ids_dir={trace}"]
    run_dir = tmp_path / "runs" / "killed"
    log = tmp_path / "driver.log"
    code = start_and_signal(["run", "configs/digits_mslg.yaml", "--name", "killed", *_sets(sets)], log,
                            {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}, signal.SIGTERM,
                            lambda: mid_epoch_committed(run_dir, after_epochs=1))
    assert code == 143, log.read_text()[-3000:]
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(run_id).info.status == "KILLED"
    assert not any(n == f"checkpoint_epoch{EPOCHS:04d}" for n in committed(run_dir)), "stopped inside the run"

    cfg = ExperimentConfig.from_yaml("configs/digits_mslg.yaml", sets + ["tracking.run_name=killed"])
    resumed = run(cfg, progress=False)
    assert resumed.mlflow_run_id == run_id and MlflowClient(resumed.tracking_uri).get_run(run_id).info.status == \
        "FINISHED", "the stopped run, resumed, ends FINISHED"
    epoch, resumed_after, ids = _ids_of_interrupted_epoch(trace)
    assert resumed_after % EVERY == 0 and resumed_after % (NOISY_ROWS // BATCH + 1), \
        f"resumed from a step checkpoint inside epoch {epoch + 1} (after global step {resumed_after})"
    assert sorted(ids) == list(range(NOISY_ROWS)), "every noisy id of the interrupted epoch trained on exactly once"

    straight = run(cfg.with_overrides(["tracking.run_name=straight", "resources.num_workers=0",
                                       "train.trace_ids_dir=null"]), progress=False)
    for a, b in zip(*(torch.load(Path(r.checkpoint_path) / "model.pt").values() for r in (resumed, straight))):
        assert torch.equal(a, b), "final weights equal an uninterrupted run's"
    tables = [pq.read_table(Path(r.checkpoint_path) / "label_table.parquet").to_pandas() for r in (resumed, straight)]
    assert tables[0].equals(tables[1]), "the label table equals an uninterrupted run's"
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in straight.history]

    steps = EPOCHS * (NOISY_ROWS // BATCH + 1)
    for key in ("step/samples_per_s", "step/train_loss", "step/lr", "step/meta_share", "step/step_time_s"):
        assert _step_history(resumed.tracking_uri, resumed.mlflow_run_id, key) == \
            list(range(LOG_EVERY, steps + 1, LOG_EVERY)), f"{key}: each step once, at the global step"
    assert _step_history(resumed.tracking_uri, resumed.mlflow_run_id, "val_accuracy") == list(range(1, EPOCHS + 1))
    shares = {m.step: m.value for m in MlflowClient(resumed.tracking_uri).get_metric_history(
        resumed.mlflow_run_id, "step/meta_share")}
    per_epoch = NOISY_ROWS // BATCH + 1
    assert all(v == 0.0 for s, v in shares.items() if s <= per_epoch), "warm-up epoch: no meta step"
    assert all(0.0 < v < 1.0 for s, v in shares.items() if s > per_epoch + LOG_EVERY), "then one every step"
    assert (run_dir / "best" / "model.pt").is_file(), "the best epoch's model is kept apart"
    assert len(committed(run_dir)) == 2, "train.keep_checkpoints=2"


def test_a_worker_killed_mid_epoch_is_retried_inside_it_each_id_once(erm_two_workers_one_killed):
    """conftest's erm run on two workers, one SIGKILLed once a step checkpoint inside epoch 2 was committed."""
    from background_runs import WORKERS_EPOCHS
    from conftest import KILLED_CHECKPOINT_EVERY, KILLED_LOG_EVERY, KILLED_STEPS_PER_EPOCH

    result, run_dir, trace, _, _ = erm_two_workers_one_killed
    epoch, resumed_after, ids = _ids_of_interrupted_epoch(trace)
    assert resumed_after % KILLED_CHECKPOINT_EVERY == 0 and resumed_after % KILLED_STEPS_PER_EPOCH, \
        f"resumed from a step checkpoint inside epoch {epoch + 1} (after global step {resumed_after})"
    assert sorted(ids) == list(range(NOISY_ROWS)), "every noisy id of the interrupted epoch trained on exactly once"
    assert [h["noisy_rows_seen"] for h in result.history] == [NOISY_ROWS] * WORKERS_EPOCHS
    assert [h["steps"] for h in result.history] == [KILLED_STEPS_PER_EPOCH] * WORKERS_EPOCHS, \
        "the interrupted epoch's steps, once"
    decisions = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["retry"], decisions
    steps = WORKERS_EPOCHS * KILLED_STEPS_PER_EPOCH
    assert _step_history(result.tracking_uri, result.mlflow_run_id, "step/samples_per_s") == \
        list(range(KILLED_LOG_EVERY, steps + 1, KILLED_LOG_EVERY))
