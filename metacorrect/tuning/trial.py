"""One sweep trial = one full Ray Train run of the platform, launched from a Ray Tune function trainable.

Ray Train V2 (Ray 2.60) no longer accepts a Trainer as a `Tuner`'s trainable: the trial function builds the
same `TorchTrainer` as `metacorrect run` and forwards every epoch report to Tune (mid-epoch ones are not),
so schedulers such as ASHA see the validation metric after each epoch.

Resume: a trial's Train run is named after its Tune trial id, which survives `Tuner.restore`, so a restarted
trial resumes from its own last checkpoint and appends to its own MLflow child run. A trial whose run had
already finished when the driver died is not trained again: its recorded history is replayed to Tune.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metacorrect.config import ExperimentConfig

DRIVER_CPUS = 0.05  # a trial that only drives its Train run; the work is on the Train workers
TRIAL_RESULT_FILE = "trial_result.json"  # written once the trial's run has finished and been logged
TRIAL_PARAMS_FILE = "trial_params.json"  # the sampled values, checked when a run directory is reused


@dataclass
class TrialContext:
    """What the sweep driver resolved for every trial (absolute paths and URIs)."""

    config: dict[str, Any]  # the base experiment, resources already set for one trial
    data_dir: str
    tracking_uri: str
    parent_run_id: str
    sweep_name: str
    trial_storage: str  # Ray Train storage of the trials' runs


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: the platform's run for `params`, its epochs reported to Tune."""
    from ray import tune
    from metacorrect.datasets.contract import read_meta
    from metacorrect.platform import quiet, trainer
    from metacorrect.platform.run_layout import trial_name

    quiet.quiet_this_process()
    trial_id = tune.get_context().get_trial_id()
    cfg = ExperimentConfig.from_dict(context.config).with_values(params)
    name = trial_run_name(trial_id)
    storage = Path(context.trial_storage)
    run_dir = storage / name
    _check_params(run_dir, params)

    finished = run_dir / TRIAL_RESULT_FILE
    if finished.is_file():  # finished before the driver was interrupted: report it, do not train again
        for row in json.loads(finished.read_text())["history"]:
            tune.report(row)
        return

    started = time.time()
    data_dir = Path(context.data_dir)
    run_id, _ = trainer.open_tracked_run(
        context.tracking_uri, cfg, read_meta(data_dir), data_dir, name, run_dir,
        tags={"mlflow.parentRunId": context.parent_run_id, "sweep": context.sweep_name, "trial_id": trial_id},
        mlflow_name=trial_name(params, trial_id))  # named by its searched values in MLflow
    run = build_trial_trainer(cfg, data_dir, read_meta(data_dir), name=name, storage=storage,
                              uri=context.tracking_uri, run_id=run_id)
    # Not closed here on failure: a trial stopped by the scheduler fails inside `fit()` too, possibly after the
    # sweep driver closed its run FINISHED; the driver closes every child run that is still open.
    result = trainer.fit_tracked(run, context.tracking_uri, run_id, name, run_dir, close_on_failure=False)
    out = trainer.finish_run(cfg, result.checkpoint, name=name, uri=context.tracking_uri, run_id=run_id,
                             run_dir=run_dir, data_dir=data_dir, started=started)
    write_trial_result(run_dir, out.history, out.checkpoint_path)


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Tune reserves for the trial's own process: little when Ray Train workers do the work (they reserve
    their own), a worker's share when the trial runs the loop itself (`resources.num_workers: 0`)."""
    r = cfg.resources
    if r.num_workers:
        return {"cpu": DRIVER_CPUS}
    return {"cpu": r.cpus_per_worker or 1.0} | ({"gpu": r.gpus_per_worker} if r.use_gpu else {})


def describe_trial_resources(cfg: ExperimentConfig) -> str:
    """'2 worker(s) x 0.5 CPU + 0.5 GPU', or 'the loop in the trial process x 1.0 CPU' (num_workers: 0)."""
    r = cfg.resources
    where = f"{r.num_workers} worker(s)" if r.num_workers else "the loop in the trial process"
    return f"{where} x {r.cpus_per_worker} CPU" + (f" + {r.gpus_per_worker} GPU" if r.use_gpu else "")


def build_trial_trainer(cfg: ExperimentConfig, data_dir: Path, meta, *, name: str, storage: Path, uri: str,
                        run_id: str):
    """A trial's run, every epoch reported to Tune: from the Ray Train workers by a callback, or, with
    `resources.num_workers: 0`, by the loop itself, which then runs in the trial's process (no Train controller
    or worker processes: the cheap way to sweep a small model). No per-epoch lines: sweeps print one per trial."""
    from metacorrect.platform import trainer

    local = cfg.resources.num_workers == 0
    return trainer.build_trainer(cfg, data_dir, meta, name=name, storage=storage, uri=uri, run_id=run_id,
                                 callbacks=None if local else [_epoch_reports()], progress=False,
                                 tune_reports=local)


def _epoch_reports():
    from ray.tune.integration.ray_train import TuneReportCallback

    from metacorrect.platform.records import MID_EPOCH

    class EpochReports(TuneReportCallback):
        """Forwards epoch reports only: Tune's schedulers compare trials at epochs, and a mid-epoch checkpoint's
        report has no validation metric."""

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics[0].get(MID_EPOCH):
                super().after_report(run_context, metrics, checkpoint)

    return EpochReports()


def write_trial_result(run_dir: Path, history: list[dict[str, float]], checkpoint_path: str | None) -> None:
    """Atomically, so a half-written file never looks like a finished trial."""
    tmp = run_dir / f".{TRIAL_RESULT_FILE}.tmp"
    tmp.write_text(json.dumps({"history": history, "checkpoint_path": checkpoint_path}))
    os.replace(tmp, run_dir / TRIAL_RESULT_FILE)


def _check_params(run_dir: Path, params: dict[str, Any]) -> None:
    """A reused run directory must belong to the same sampled values (else it would resume another trial)."""
    path = run_dir / TRIAL_PARAMS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(params)):
            raise RuntimeError(f"{run_dir}: holds the run of {stored}, not of {params}; "
                               f"delete that directory or start the sweep under a new name")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(params))
