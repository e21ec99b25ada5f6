"""A run's records made transactional: an epoch's metrics, and the step metrics of the steps a checkpoint
covers, reach MLflow only once that checkpoint is committed.

Commit means: with Ray Train workers, Ray's checkpoint manager has registered the checkpoint and written its
state to the run directory (what a restarted driver resumes from); in local mode (`num_workers: 0`), the
checkpoint directory has been renamed into place. Rank 0 logs an epoch's metrics after that, from a background
thread (Ray commits a report on its next poll of the workers, up to 2 s later, and training need not wait).

On every start of the loop (a new run, a driver restarted with the same name, or a worker group restarted by
Ray after a failure) the committed state is restored, checkpoint directories that were written but never
committed are removed (with the node-local copies that killed workers left half-written), and committed epochs
that MLflow does not hold yet (the process died between commit and logging) are logged. So MLflow holds each
epoch and each logged step once, in order, and only work a resumed run continues from; its history is what an
uninterrupted run would have logged. Mid-epoch checkpoints (`train.checkpoint_every`) carry every worker's
position in the epoch (`epoch_position.py`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable
from typing import Any

import ray.train
import torch

from metacorrect.platform import checkpoint as ckpt
from metacorrect.platform import tracking

PREFIX = "checkpoint_epoch"
STEP_KEY = "step/samples_per_s"  # logged with every step row (its steps are the steps MLflow holds)
EPOCH_KEY = "lr"  # a metric of every epoch row (its steps are the epochs MLflow holds; `epoch` itself is a tag)
MID_EPOCH = "mid_epoch"  # in the report of a mid-epoch checkpoint (sweeps forward only epoch reports to Tune)
CHECKPOINT_PATH_KEY = "checkpoint_path"  # where a Tune report's checkpoint is (the key of Ray's TuneReportCallback)
BEST_DIR = "best"  # run_dir/best: the best epoch's model by validation accuracy, apart from the kept checkpoints
# A checkpoint is written on the worker's node first (Ray copies it into the run directory and we delete it); the
# name carries the writing process's pid, so one left by a killed worker is known as orphaned and removed.
STAGING_PREFIX = "metacorrect-checkpoint-"


def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """`checkpoint_epoch0003` after 3 epochs; `checkpoint_epoch0003_step0000500` 500 steps into the 4th (names
    sort in training order)."""
    return f"{PREFIX}{epoch:04d}" + (f"_step{step_in_epoch:07d}" if step_in_epoch else "")


def log_missing_epochs(uri: str, run_id: str, history: list[dict[str, float]],
                       step_history: list[dict[str, float]] | None = None) -> int:
    """Log the epochs of a committed `history` and the step rows of its `step_history` that the MLflow run does
    not hold yet (`lr` is logged with every epoch, `step/samples_per_s` with every step row, each in one
    batch with the rest of its row); returns how many rows."""
    logged = tracking.logged_steps(uri, run_id, EPOCH_KEY)
    rows = [(int(row["epoch"]), row) for row in history if int(row["epoch"]) not in logged]
    if step_history:
        logged_steps = tracking.logged_steps(uri, run_id, STEP_KEY)
        rows += [(int(row["global_step"]), _step_metrics(row)) for row in step_history
                 if int(row["global_step"]) not in logged_steps]
    tracking.log_rows(uri, run_id, rows)
    return len(rows)


def _step_metrics(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "global_step"}


def load_positions(directory: str | Path) -> dict[int, dict[str, Any]]:
    """Every worker's position file in a checkpoint directory, by rank ({} at an epoch end)."""
    from metacorrect.platform.epoch_position import RANK_FILE

    prefix = RANK_FILE.split("{")[0]
    return {int(f.stem.removeprefix(prefix)): torch.load(f, weights_only=False)
            for f in Path(directory).glob(RANK_FILE.format(rank="*"))}


def staging_dir(name: str) -> Path:
    """A new directory in the node's temporary directory to write checkpoint `name` in before Ray copies it."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{name}-"))


def remove_orphaned_staging(root: str | Path | None = None) -> int:
    """Remove the staging directories (`staging_dir`) under `root` (default: the temporary directory) whose
    writing process is gone, as after a worker killed mid-checkpoint; returns how many."""
    removed = 0
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def latest_local_checkpoint(root: Path) -> ray.train.Checkpoint | None:
    """The newest committed checkpoint of a local-mode run (`num_workers: 0`), whose checkpoints are our own."""
    found = sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


class RunRecords:
    """Checkpoints and MLflow metrics of one worker's training loop (only rank 0 writes)."""

    def __init__(self, run_dir: str | Path, tracking_uri: str, mlflow_run_id: str, rank: int,
                 local_checkpoints: str | None = None, keep: int = 2, tune_reports: bool = False):
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.tune_reports = tune_reports
        self.uri, self.run_id, self.rank = tracking_uri, mlflow_run_id, rank
        self.local_root = Path(local_checkpoints) if local_checkpoints else None
        self._logger = ThreadPoolExecutor(1, thread_name_prefix="mlflow-log") if rank == 0 and not self.local_root \
            else None
        self._pending: list[Future] = []

    # ---- start -----------------------------------------------------------------------------------------
    def restore(self, device: torch.device | str) -> dict[str, Any] | None:
        """The committed state to continue from (None for a fresh run), with `positions`: every worker's position
        file of a mid-epoch checkpoint, by rank. Rank 0 removes uncommitted checkpoint directories and logs
        committed epochs and steps that MLflow lacks."""
        remove_orphaned_staging()  # this node's, left by workers killed while writing (every rank: every node)
        checkpoint = self._latest_committed()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = ckpt.load_state(directory, device)
                state["positions"] = load_positions(directory)
        if self.rank == 0:
            self._remove_uncommitted()
            if state:  # a fresh run has nothing to catch up on (and need not wait for MLflow's import here)
                log_missing_epochs(self.uri, self.run_id, state["history"], state.get("step_history"))
        return state

    def _latest_committed(self) -> ray.train.Checkpoint | None:
        if self.local_root:
            return latest_local_checkpoint(self.local_root)
        return ray.train.get_checkpoint()

    def _remove_uncommitted(self) -> None:
        if self.local_root:
            for stale in self.local_root.glob(".tmp-*") if self.local_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
        for stale in self.run_dir.glob(".best-*"):  # a copy of the best model cut short
            shutil.rmtree(stale, ignore_errors=True)
        if self.local_root:
            return
        from ray.train import CheckpointConsistencyMode

        committed = {Path(c.checkpoint.path).name for c in ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED)}
        for path in self.run_dir.glob("checkpoint_*"):
            if path.is_dir() and path.name not in committed:
                shutil.rmtree(path, ignore_errors=True)

    # ---- each checkpoint -------------------------------------------------------------------------------
    def commit(self, name: str, report: dict[str, float], state: dict[str, Any] | None,
               extras: dict[str, bytes] | None = None, position: Callable[[Path], None] | None = None,
               rows: list[tuple[int, dict[str, float]]] = (), best: bool = False) -> None:
        """Checkpoint `state` (rank 0's; None elsewhere) under `name` and report `report`; every worker calls
        this (Ray's report is a barrier). `position` writes this worker's file of a mid-epoch checkpoint. Once
        the commit is done, rank 0 logs `rows` ((MLflow step, metrics) of the epoch and the steps this
        checkpoint covers) and, when `best`, keeps the checkpoint's model as the best epoch's."""
        self._raise_logging_errors()
        pending_best = self._stage_best(name, state) if best and self.rank == 0 else None
        directory = None
        if self.rank == 0 or position is not None:
            directory = self._write(name, state, extras or {}, position)
        if not self.local_root:  # Ray Train's report: a barrier of the workers, and Ray's commit
            try:
                checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
                ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=name)
            finally:
                if directory:  # Ray copied it into the run directory
                    ckpt.discard(directory)
        if self.rank != 0:
            return
        if self.local_root:  # committed by the rename in _write
            ckpt.prune(self.local_root, keep=self.keep, prefix=PREFIX)
            self._after_commit(list(rows), pending_best)
            if self.tune_reports and not report.get(MID_EPOCH):
                self._report_to_tune(report, directory)
        else:
            self._pending.append(self._logger.submit(self._log_when_committed, list(rows), pending_best))

    def _write(self, name: str, state: dict[str, Any] | None, extras: dict[str, bytes],
               position: Callable[[Path], None] | None) -> Path:
        if self.local_root:
            self.local_root.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.local_root))
        else:
            directory = staging_dir(name)
        if state is not None:
            ckpt.write_state(directory, state, extras)
        if position is not None:
            position(directory)
        if self.local_root:
            final = self.local_root / name
            shutil.rmtree(final, ignore_errors=True)
            os.rename(directory, final)
            return final
        return directory

    def _stage_best(self, name: str, state: dict[str, Any]) -> Path:
        """The best epoch's model, written beside `best/` now and moved into place once committed (Ray may
        prune the checkpoint itself by then)."""
        staged = self.run_dir / f".best-{name}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        torch.save(state["model"], staged / ckpt.MODEL_FILE)
        (staged / ckpt.HISTORY_FILE).write_text(json.dumps(state["history"]))
        return staged

    def _log_when_committed(self, rows: list[tuple[int, dict[str, float]]], best: Path | None) -> None:
        from ray.train import CheckpointConsistencyMode

        # Returns once every report made so far, this one included, is committed.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        self._after_commit(rows, best)

    def _after_commit(self, rows: list[tuple[int, dict[str, float]]], best: Path | None) -> None:
        tracking.log_rows(self.uri, self.run_id, rows)
        if best is not None:  # kept apart from the checkpoints Ray prunes; replaced whole
            keep, old = self.run_dir / BEST_DIR, self.run_dir / f".best-old-{os.getpid()}"
            if keep.exists():
                os.rename(keep, old)
            os.rename(best, keep)
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _report_to_tune(report: dict[str, float], checkpoint: Path) -> None:
        """What a sweep trial's Ray Train callback forwards from workers (the epoch's report and where its
        checkpoint is), sent from this process: a trial in local mode runs its loop in the Tune trial itself.
        Once the checkpoint is committed and the epoch logged, as with workers; Tune's schedulers compare trials
        at epochs, so mid-epoch reports are not sent."""
        from ray import tune

        tune.report(report | {CHECKPOINT_PATH_KEY: str(checkpoint)})

    def _raise_logging_errors(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()  # an MLflow failure surfaces in the training loop, not in a thread

    def close(self) -> None:
        """Wait until every committed epoch is logged (end of the loop)."""
        if self._logger:
            self._logger.shutdown(wait=True)
            for f in self._pending:
                f.result()
            self._pending = []
