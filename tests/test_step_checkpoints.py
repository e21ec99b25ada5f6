"""Step checkpoints (`train.checkpoint_every`) and step metrics (`train.log_every`), with real processes: a
driver killed by SIGKILL and, started again, stopped by SIGTERM, and a Ray Train worker SIGKILLed by pid
(conftest's erm run, shared with the other fault and two-worker tests), in the middle of an epoch. The run
resumes inside the epoch, every noisy id of that epoch is trained on exactly once across the interruption (read
from `train.trace_ids_dir`, the ids each step trained on), and with one worker and `data.deterministic: true` the
final weights, label table and MLflow history equal an uninterrupted run's."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from procs import set_args, start_and_signal
from ray_state import alive_actors, left_behind
from run_dirs import committed, mid_epoch_committed

pytestmark = pytest.mark.slow

NOISY_ROWS = 1138
# The kill lands at the checkpoint written after the first commit (global step 20, inside epoch 1). The stop
# is sent once the first step checkpoint inside epoch 2 is committed (global step 80) and must land
# before that epoch ends (step 144), or the run resumes from the epoch's end instead of inside it: 64 steps of
# room. At batch 32 (36 steps an epoch, 32 of room) a loaded box's stop sometimes took longer than the steps.
BATCH = 16  # 72 steps an epoch
EVERY = 10
LOG_EVERY = 4
EPOCHS = 3  # stopped inside the second; the third leaves the stop room to land before the run ends


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


def _ids_by_epoch(trace_dir: Path) -> tuple[list[int], dict[int, list[int]]]:
    """(the step each later attempt resumed after, the ids each epoch trained on: every attempt's lines up to the
    step the next one resumed from)."""
    attempts = _attempts(trace_dir)
    resumed = [min(line["step"] for line in a) - 1 for a in attempts[1:]]
    ids: dict[int, list[int]] = {}
    for attempt, until in zip(attempts, resumed + [None]):
        for line in attempt:
            if until is None or line["step"] <= until:
                ids.setdefault(line["epoch"], []).extend(line["ids"])
    return resumed, ids


def _step_history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _common(data: Path, tmp_path: Path) -> list[str]:
    return [f"data.path={data}", f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}", "model.width=8",
            f"train.checkpoint_every={EVERY}", f"train.log_every={LOG_EVERY}", "data.deterministic=true",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", f"tracking.storage_path={tmp_path / 'runs'}",
            "tracking.experiment=step-checkpoints", "method.warmup_epochs=1", "method.label_lr=20000"]


def test_a_driver_killed_then_stopped_mid_epoch_resumes_each_time_each_id_once_and_ends_as_an_uninterrupted_run(
        ray_cluster, digits_noisy, tmp_path):
    """One run through both ways a driver on Ray Train ends: SIGKILL, as on a crash, the moment a new checkpoint is
    written after the first commit (most likely before Ray records it); then, started again with the same name,
    SIGTERM (a scheduler's stop; Ctrl-C takes the same handler) once a step checkpoint inside epoch 2 is committed:
    exit status 143 and the MLflow run KILLED. Resumed once more, it ends FINISHED, each epoch and step logged once,
    every noisy id of each epoch trained on once, with the weights, label table and history of an uninterrupted
    run, no uncommitted checkpoint and nothing left running."""
    from mlflow.tracking import MlflowClient

    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    trace = tmp_path / "trace"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    sets = _common(digits_noisy, tmp_path) + ["resources.num_workers=1", "resources.cpus_per_worker=1",
                                               f"train.trace_ids_dir={trace}"]
    args = ["run", "configs/digits_mslg.yaml", "--name", "killed", *set_args(sets)]
    run_dir = tmp_path / "runs" / "killed"
    log = tmp_path / "driver.log"
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}

    def a_new_checkpoint_after_a_commit() -> bool:
        done = set(committed(run_dir))
        return bool(done) and bool({p.name for p in run_dir.glob("checkpoint_epoch*")} - done)

    start_and_signal(args, log, env, signal.SIGKILL, a_new_checkpoint_after_a_commit)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    uncommitted = {p.name for p in run_dir.glob("checkpoint_epoch*")} - set(committed(run_dir))
    assert client.get_run(run_id).info.status == "RUNNING", "a crashed driver could not close its run"
    assert not any(n.startswith("checkpoint_epoch0001") for n in committed(run_dir)), \
        "killed inside the first epoch, so that the second start has the second to be stopped in"

    code = start_and_signal(args, log, env, signal.SIGTERM, lambda: mid_epoch_committed(run_dir, after_epochs=1))
    assert code == 143, log.read_text()[-3000:]
    assert client.get_run(run_id).info.status == "KILLED"
    assert not any(n == f"checkpoint_epoch{EPOCHS:04d}" for n in committed(run_dir)), "stopped inside the run"
    for key in ("val_accuracy", "step/train_loss"):
        logged = _step_history(uri, run_id, key)
        assert len(logged) == len(set(logged)), (key, logged)

    before = alive_actors()
    cfg = ExperimentConfig.from_yaml("configs/digits_mslg.yaml", sets + ["tracking.run_name=killed"])
    resumed = run(cfg, progress=False)
    assert resumed.mlflow_run_id == run_id and client.get_run(run_id).info.status == "FINISHED", \
        "every start appended to the same MLflow run, and the last ended it FINISHED"
    resumed_after, ids = _ids_by_epoch(trace)
    per_epoch = NOISY_ROWS // BATCH + 1
    assert len(resumed_after) == 2 and all(s % EVERY == 0 and s % per_epoch for s in resumed_after), \
        f"each start resumed from a step checkpoint inside an epoch (after global steps {resumed_after})"
    assert sorted(ids) == list(range(EPOCHS)) and all(sorted(v) == list(range(NOISY_ROWS)) for v in ids.values()), \
        "every noisy id of every epoch trained on exactly once"

    # The same loop in this process (local mode) is the uninterrupted reference: the same arithmetic, faster.
    straight = run(cfg.with_overrides(["tracking.run_name=straight", "resources.num_workers=0",
                                       "train.trace_ids_dir=null"]), progress=False)
    left, groups = left_behind(before)
    assert not left and not groups, f"a run on one worker and one in the driver left {left} {groups} running"
    for a, b in zip(*(torch.load(Path(r.checkpoint_path) / "model.pt").values() for r in (resumed, straight))):
        assert torch.equal(a, b), "final weights equal an uninterrupted run's"
    tables = [pq.read_table(Path(r.checkpoint_path) / "label_table.parquet").to_pandas() for r in (resumed, straight)]
    assert tables[0].equals(tables[1]), "the label table equals an uninterrupted run's"
    for key in ("val_accuracy", "test_accuracy", "train_loss", "noisy_recovery", "lr"):  # lr: in every epoch row
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == list(range(1, EPOCHS + 1)), (key, history)
        assert history == sorted((m.step, m.value) for m in client.get_metric_history(straight.mlflow_run_id, key)), \
            f"{key}: resumed != uninterrupted"

    steps = EPOCHS * per_epoch
    for key in ("step/samples_per_s", "step/train_loss", "step/lr", "step/meta_share", "step/step_time_s"):
        assert _step_history(uri, run_id, key) == list(range(LOG_EVERY, steps + 1, LOG_EVERY)), \
            f"{key}: each step once, at the global step"
    shares = {m.step: m.value for m in client.get_metric_history(run_id, "step/meta_share")}
    assert all(v == 0.0 for s, v in shares.items() if s <= per_epoch), "warm-up epoch: no meta step"
    assert all(0.0 < v < 1.0 for s, v in shares.items() if s > per_epoch + LOG_EVERY), "then one every step"
    assert (run_dir / "best" / "model.pt").is_file(), "the best epoch's model is kept apart"
    left = {p.name for p in run_dir.glob("checkpoint_epoch*")}
    assert left == set(committed(run_dir)) and len(left) == 2, \
        f"only committed checkpoints remain, train.keep_checkpoints=2 of them (uncommitted at the kill: {uncommitted})"
    journal = run_dir / "failures.jsonl"
    assert not journal.exists(), f"a stopped driver is not a training failure: {journal.read_text()[-2000:]}"


def test_a_worker_killed_mid_epoch_is_retried_inside_it_each_id_once(erm_two_workers_one_killed):
    """conftest's erm run on two workers, one SIGKILLed once a step checkpoint inside epoch 2 was committed."""
    from background_runs import WORKERS_EPOCHS
    from conftest import KILLED_CHECKPOINT_EVERY, KILLED_LOG_EVERY, KILLED_STEPS_PER_EPOCH

    result, run_dir, trace, _, _ = erm_two_workers_one_killed
    (resumed_after,), ids = _ids_by_epoch(trace)
    assert resumed_after % KILLED_CHECKPOINT_EVERY == 0 and resumed_after % KILLED_STEPS_PER_EPOCH, \
        f"the retry resumed from a step checkpoint inside an epoch (after global step {resumed_after})"
    assert sorted(ids) == list(range(WORKERS_EPOCHS)) and all(sorted(v) == list(range(NOISY_ROWS))
                                                             for v in ids.values()), \
        "every noisy id of every epoch, the interrupted one too, trained on exactly once"
    assert [h["noisy_rows_seen"] for h in result.history] == [NOISY_ROWS] * WORKERS_EPOCHS
    assert [h["steps"] for h in result.history] == [KILLED_STEPS_PER_EPOCH] * WORKERS_EPOCHS, \
        "the interrupted epoch's steps, once"
    decisions = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["retry"], decisions
    steps = WORKERS_EPOCHS * KILLED_STEPS_PER_EPOCH
    assert _step_history(result.tracking_uri, result.mlflow_run_id, "step/samples_per_s") == \
        list(range(KILLED_LOG_EVERY, steps + 1, KILLED_LOG_EVERY))
