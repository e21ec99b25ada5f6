"""A run's records made transactional: an epoch reaches MLflow only once its checkpoint is committed.

Commit means: with Ray Train workers, Ray's checkpoint manager has registered the checkpoint and written its
state to the run directory (what a restarted driver resumes from); in local mode (`num_workers: 0`), the
checkpoint directory has been renamed into place. Rank 0 logs an epoch's metrics after that, from a background
thread (Ray commits a report on its next poll of the workers, up to 2 s later, and training need not wait).

On every start of the loop (a new run, a driver restarted with the same name, or a worker group restarted by
Ray after a failure) the committed state is restored, checkpoint directories that were written but never
committed are removed, and committed epochs that MLflow does not hold yet (the process died between commit
and logging) are logged. So MLflow holds each epoch once, in order, and only epochs a resumed run continues
from; its history is what an uninterrupted run would have logged.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray.train
import torch

from metacorrect.platform import checkpoint as ckpt
from metacorrect.platform import tracking

PREFIX = "checkpoint_epoch"


def checkpoint_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:04d}"


def log_missing_epochs(uri: str, run_id: str, history: list[dict[str, float]]) -> int:
    """Log the epochs of a committed `history` that the MLflow run does not hold yet (its `epoch` metric is
    logged with every epoch, in the same batch as the others); returns how many."""
    logged = tracking.logged_steps(uri, run_id, "epoch")
    missing = [row for row in history if int(row["epoch"]) not in logged]
    for row in missing:
        tracking.log_metrics(uri, run_id, row, step=int(row["epoch"]))
    return len(missing)


class RunRecords:
    """Checkpoints and MLflow metrics of one worker's training loop (only rank 0 writes)."""

    def __init__(self, run_dir: str | Path, tracking_uri: str, mlflow_run_id: str, rank: int,
                 local_checkpoints: str | None = None):
        self.run_dir = Path(run_dir)
        self.uri, self.run_id, self.rank = tracking_uri, mlflow_run_id, rank
        self.local_root = Path(local_checkpoints) if local_checkpoints else None
        self._logger = ThreadPoolExecutor(1, thread_name_prefix="mlflow-log") if rank == 0 and not self.local_root \
            else None
        self._pending: list[Future] = []

    # ---- start -----------------------------------------------------------------------------------------
    def restore(self, device: torch.device | str) -> dict[str, Any] | None:
        """The committed state to continue from (None for a fresh run); rank 0 removes uncommitted checkpoint
        directories and logs committed epochs that MLflow lacks."""
        checkpoint = self._latest_committed()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = ckpt.load_state(directory, device)
        if self.rank == 0:
            self._remove_uncommitted()
            if state:  # a fresh run has nothing to catch up on (and need not wait for MLflow's import here)
                self._log_missing(state["history"])
        return state

    def _latest_committed(self) -> ray.train.Checkpoint | None:
        if self.local_root:
            found = sorted(self.local_root.glob(f"{PREFIX}*")) if self.local_root.is_dir() else []
            return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None
        return ray.train.get_checkpoint()

    def _remove_uncommitted(self) -> None:
        if self.local_root:
            for stale in self.local_root.glob(".tmp-*") if self.local_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
            return
        from ray.train import CheckpointConsistencyMode

        committed = {Path(c.checkpoint.path).name for c in ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED)}
        for path in self.run_dir.glob("checkpoint_*"):
            if path.is_dir() and path.name not in committed:
                shutil.rmtree(path, ignore_errors=True)

    def _log_missing(self, history: list[dict[str, float]]) -> None:
        log_missing_epochs(self.uri, self.run_id, history)

    # ---- each epoch --------------------------------------------------------------------------------------
    def commit(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None,
               extras: dict[str, bytes] | None) -> None:
        """Checkpoint `state` (rank 0's; None elsewhere) as epoch `epoch` and report `metrics`; every worker
        calls this (Ray's report is a barrier). Rank 0 logs the metrics to MLflow once the commit is done."""
        self._raise_logging_errors()
        directory = None
        if self.rank == 0:
            directory = self._write(epoch, state, extras or {})
        try:
            checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(epoch))
        finally:
            if directory and not self.local_root:  # Ray copied it into the run directory
                ckpt.discard(directory)
        if self.rank != 0:
            return
        if self.local_root:  # committed by the rename in _write
            ckpt.prune(self.local_root, prefix=PREFIX)
            tracking.log_metrics(self.uri, self.run_id, metrics, step=epoch)
        else:
            self._pending.append(self._logger.submit(self._log_when_committed, epoch, dict(metrics)))

    def _write(self, epoch: int, state: dict[str, Any], extras: dict[str, bytes]) -> Path:
        if not self.local_root:
            return ckpt.save_state(state, extras)
        self.local_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.local_root))
        ckpt.write_state(scratch, state, extras)
        final = self.local_root / checkpoint_name(epoch)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(scratch, final)
        return final

    def _log_when_committed(self, epoch: int, metrics: dict[str, float]) -> None:
        from ray.train import CheckpointConsistencyMode

        # Returns once every report made so far, this epoch's included, is committed.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        tracking.log_metrics(self.uri, self.run_id, metrics, step=epoch)

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
