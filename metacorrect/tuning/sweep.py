"""`sweep()`: Ray Tune over any config field, every trial a full Ray Train run, one MLflow parent run.

Layout under `tracking.storage_path`:

    <sweep name>/                    Tune's experiment directory (state for --resume) + mlflow_run.json (parent)
    <sweep name>/trial_runs/trial-<trial id>/   each trial's Ray Train run: checkpoints, its MLflow child run id
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacorrect.config import ConfigError, ExperimentConfig
from metacorrect.tuning.space import load_space, space_to_yaml, to_tune
from metacorrect.platform.records import CHECKPOINT_PATH_KEY
from metacorrect.tuning.trial import (DRIVER_CPUS, TRIAL_RESULT_FILE, TrialContext, describe_trial_resources,
                                      run_trial, trial_resources, trial_run_name, write_trial_result)

SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
TRIAL_RUNS = "trial_runs"
TRIAL_PLAN_FILE = "trial_plan.json"  # trials at a time and CPUs per worker, as the first start planned them


@dataclass
class SweepOptions:
    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "val_accuracy"
    mode: str | None = None  # default: min for losses, else max
    max_concurrent_trials: int | None = None  # default: as many as the cluster's free CPUs/GPUs fit
    seed: int = 0  # of the search, so a resumed sweep draws the same configs

    def problems(self, space: dict[str, Any]) -> list[str]:
        problems = []
        if self.num_samples < 1:
            problems.append(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.scheduler == "pbt":
            problems.append("scheduler: 'pbt' needs Tune checkpoints to copy between trials; trials here are Ray "
                            "Train runs whose checkpoints Tune does not manage (use asha or fifo)")
        elif self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got '{self.scheduler}'")
        if self.search not in SEARCHES:
            problems.append(f"search: expected one of {', '.join(SEARCHES)}, got '{self.search}'")
        elif self.search == "optuna":
            if importlib.util.find_spec("optuna") is None:
                problems.append("search: 'optuna' needs the optuna package (pip install 'optuna>=3')")
            if any("grid" in spec for spec in space.values()):
                problems.append("search: optuna cannot take grid entries; use choice instead")
        if not self.metric.startswith("val_"):
            problems.append(f"metric: expected a validation metric reported every epoch (val_accuracy or val_loss), "
                            f"got '{self.metric}' (the test split is never used to select)")
        if self.mode not in (None, "max", "min"):
            problems.append(f"mode: expected max or min, got '{self.mode}'")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            problems.append(f"max_concurrent_trials: must be >= 1, got {self.max_concurrent_trials}")
        return problems

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if "loss" in self.metric else "max")


@dataclass
class SweepResult:
    name: str
    path: str  # the sweep's directory (Tune state, trials' Train runs)
    metric: str
    mode: str
    trials: Any  # pandas DataFrame, one row per trial, best first
    searched: list[str]
    best_trial_id: str | None
    best_config: ExperimentConfig | None  # the base config with the best trial's values
    parent_run_id: str
    tracking_uri: str
    wall_s: float = 0.0
    best_params: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, tuple[list, list]] = field(default_factory=dict, repr=False)  # trial -> (epochs, metric)

    def save_best(self, path: str | Path) -> Path:
        """The best config as YAML, ready for `metacorrect run` (no run name: a fresh run)."""
        if self.best_config is None:
            raise ConfigError(f"sweep {self.name}: no trial reported {self.metric}, so there is no best config")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.best_config.to_yaml(path)
        return path

    def table(self) -> str:
        return format_trials(self.trials, self.searched, self.metric)

    def __str__(self) -> str:
        from metacorrect.platform.results import where

        best = (f"best: trial {self.best_trial_id}, {self.metric} {self.trials.iloc[0]['best_' + self.metric]:.4f}"
                if self.best_trial_id else "best: none")
        return (f"{self.table()}\n{best}\nsweep {self.name}: {len(self.trials)} trials, MLflow parent run "
                f"{self.parent_run_id}\n{where(self.tracking_uri, self.parent_run_id)}")


def sweep(config: ExperimentConfig | str | Path | dict[str, Any] | None = None,
          space: dict[str, Any] | str | Path | None = None, num_samples: int = 8, scheduler: str = "asha",
          search: str = "random", metric: str = "val_accuracy", mode: str | None = None,
          max_concurrent_trials: int | None = None, resources_per_trial: dict[str, Any] | None = None,
          name: str | None = None, resume: bool = False, overrides: list[str] | None = None,
          seed: int = 0, progress: bool = True) -> SweepResult:
    """Search `space` (default: the method's) with Ray Tune, each trial a Ray Train run tracked as a nested
    MLflow run under one parent run. `resources_per_trial` sets `resources.*` fields of every trial, e.g.
    {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}. `resume=True` continues the sweep of the
    same name: finished trials are not re-run, unfinished ones resume from their last checkpoint."""
    from metacorrect.platform import interrupts, run_layout, tracking
    from metacorrect.platform.trainer import as_config, ensure_ray, ensure_trainable_dataset

    started = time.time()
    base = _with_trial_resources(as_config(config, overrides), resources_per_trial)
    searched_space = load_space(space, base)
    options = SweepOptions(num_samples, scheduler, search, metric, mode, max_concurrent_trials, seed)
    problems = options.problems(searched_space)
    if problems:
        raise ConfigError(problems)

    storage = Path(base.tracking.storage_path).expanduser().resolve()
    name = name or base.tracking.run_name or default_sweep_name(base, searched_space, options)
    sweep_dir = storage / name
    exists = (sweep_dir / "mlflow_run.json").is_file()
    if exists and not resume:
        raise ConfigError(f"sweep '{name}' already exists at {sweep_dir}: add --resume (resume=True) to continue "
                          f"it, or --name (name=) for a new sweep")

    data_dir, meta = ensure_trainable_dataset(base.data, progress)
    ensure_ray()
    _refuse_a_stall(options, base)
    uri = tracking.resolve_tracking_uri(base.tracking.uri)
    concurrency, trial_cfg = kept_trial_plan(base, options, _count_trials(searched_space, num_samples), sweep_dir,
                                                resume)

    parent_id, resumed = tracking.start_run(uri, base.tracking.experiment, name, sweep_dir,
                                            tags=run_layout.run_tags(base, meta)
                                            | {"sweep": name, "sweep.role": "parent",
                                               run_layout.NOTE_TAG: _parent_description(base, meta, searched_space,
                                                                                         options)})
    if not resumed:
        _log_parent_start(uri, parent_id, base, searched_space, options, data_dir)
    if progress:
        print(f"[sweep] {'resuming' if resumed else 'starting'} sweep {name}: {base.method.name} on {meta.name}, "
              f"{num_samples} sample(s) of {', '.join(searched_space)}; scheduler {scheduler}, metric {metric} "
              f"({options.resolved_mode}); up to {concurrency} trial(s) at a time, each "
              f"{describe_trial_resources(trial_cfg)}")

    context = TrialContext(config=trial_cfg.to_dict(), data_dir=str(data_dir), tracking_uri=uri,
                           parent_run_id=parent_id, sweep_name=name, trial_storage=str(sweep_dir / TRIAL_RUNS))
    with tracking.parent_closed_on_failure(uri, parent_id):
        with interrupts.handlers_kept():  # Tune leaves its Ctrl-C handler behind
            grid = _tuner(context, searched_space, options, base, concurrency, sweep_dir, resume, progress).fit()
        result = _collect(grid, base, searched_space, options, name, sweep_dir, data_dir, uri, parent_id, started)
    _log_parent_end(result, searched_space, base)
    return result


def _refuse_a_stall(options: SweepOptions, base: ExperimentConfig) -> None:
    """ASHA stops trials early; a stopped trial's Ray Train workers give their CPUs and GPUs back through Ray
    Train's placement-group cleaner, which asks the cluster's state API whether the trial's controller still lives.
    Where nothing answers it (a cluster started without the dashboard) they are never given back, and the sweep
    stalls, silently, once the stopped trials hold the cluster: refused here, before any run or trial starts."""
    from metacorrect.platform.cluster import state_api_answers

    if options.scheduler == "asha" and base.resources.num_workers > 0 and not state_api_answers():
        raise ConfigError("scheduler: 'asha' stops trials early, and this Ray cluster answers no state API (it was "
                          "started without the dashboard), so a stopped trial's Ray Train workers would never give "
                          "their resources back and the sweep would stall: start the cluster with the dashboard "
                          "(Ray's default), use --scheduler fifo, or run each trial's loop in its Tune trial "
                          "(--set resources.num_workers=0)")


def _parent_description(cfg: ExperimentConfig, meta, space: dict[str, Any], options: SweepOptions) -> str:
    from metacorrect.platform.run_layout import description

    return (f"sweep of {', '.join(space)} ({options.num_samples} sample(s), {options.scheduler}, {options.search}, "
            f"{options.metric} {options.resolved_mode}); base: {description(cfg, meta)}")


def default_sweep_name(cfg: ExperimentConfig, space: dict[str, Any], options: SweepOptions) -> str:
    """Stable for the same config, space and options, so re-running a command with --resume finds its sweep."""
    key = json.dumps([cfg.to_dict(), space, vars(options)], sort_keys=True, default=str)
    return f"sweep-{cfg.method.name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def kept_trial_plan(cfg: ExperimentConfig, options: SweepOptions, num_trials: int, directory: Path,
                    resume: bool) -> tuple[int, ExperimentConfig]:
    """`plan_trials`, kept in `directory` by the first start and reused by every resume: a resumed Tune run
    restores the concurrency it started with, so its trials must keep the CPUs planned for it (more CPUs each at
    that concurrency could leave Ray Data none, and trials whose loops read data would wait forever)."""
    path = directory / TRIAL_PLAN_FILE
    if resume and path.is_file():
        kept = json.loads(path.read_text())
        return kept["concurrency"], cfg.with_values({"resources.cpus_per_worker": kept["cpus_per_worker"]})
    concurrency, cfg = plan_trials(cfg, options, num_trials)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"concurrency": concurrency, "cpus_per_worker": cfg.resources.cpus_per_worker}))
    os.replace(scratch, path)
    return concurrency, cfg


def plan_trials(cfg: ExperimentConfig, options: SweepOptions, num_trials: int,
                cluster: dict[str, float] | None = None) -> tuple[int, ExperimentConfig]:
    """(trials at a time, the config every trial starts from): CPUs per worker set so the trials that run
    together fit the cluster (default: Ray's, `ray.cluster_resources()`) and leave `resources.data_cpus` to Ray
    Data (else the data streams stall)."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    r = cfg.resources
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    loops = max(r.num_workers, 1)  # processes that train per trial (num_workers 0: the trial's own)
    driver = DRIVER_CPUS if r.num_workers else 0.0
    # A trial that trains in its own process holds its CPUs from its start, also while its data set is read,
    # and each of Ray Data's read tasks asks for a whole CPU: less than one left free and the trials wait forever.
    data = r.data_cpus if r.num_workers else max(r.data_cpus, min(1.0, cpus - 0.25))
    free_cpus = max(cpus - data, 0.25)
    per_trial_cpu = loops * (r.cpus_per_worker or 1.0) + driver
    fits = max(1, math.floor(free_cpus / per_trial_cpu))
    if r.use_gpu:
        if gpus <= 0:
            raise ConfigError("resources.use_gpu: the Ray cluster has no GPU")
        fits = max(1, min(fits, math.floor(gpus / (loops * r.gpus_per_worker))))
    concurrency = min(options.max_concurrent_trials or fits, num_trials)
    if not r.num_workers:  # more trials at once than fit would leave Ray Data no CPU (above)
        concurrency = min(concurrency, max(1, math.floor(free_cpus / (r.cpus_per_worker or 0.25))))
    if r.cpus_per_worker is None:  # share what is free among the trials that run together
        share = (free_cpus - concurrency * driver) / (concurrency * loops)
        per_worker = max(0.25, min(math.floor(share * 4) / 4, 1.0 if r.use_gpu else 8.0))
        cfg = cfg.with_values({"resources.cpus_per_worker": per_worker})
    return concurrency, cfg


def _with_trial_resources(cfg: ExperimentConfig, resources: dict[str, Any] | None) -> ExperimentConfig:
    if not resources:
        return cfg
    known = set(cfg.resources.__dataclass_fields__)
    unknown = [k for k in resources if k not in known]
    if unknown:
        raise ConfigError([f"resources_per_trial.{k}: unknown field (expected one of {', '.join(sorted(known))})"
                           for k in unknown])
    return cfg.with_values({f"resources.{k}": v for k, v in resources.items()})


def _count_trials(space: dict[str, Any], num_samples: int) -> int:
    grid = math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)
    return num_samples * grid


def _tuner(context: TrialContext, space: dict[str, Any], options: SweepOptions, base: ExperimentConfig,
           concurrency: int, sweep_dir: Path, resume: bool, progress: bool):
    from ray import tune

    from metacorrect.tuning.progress import SweepProgress

    # Tune's own console tables would interleave with our one line per trial event.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    trial_resources(ExperimentConfig.from_dict(context.config)))
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        # The callbacks, scheduler and search state come back from the sweep's own saved state.
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    epochs = base.train.epochs
    if options.scheduler == "asha":
        # `epoch` (not Tune's iteration count) so a trial restarted on resume is judged at its true epoch.
        scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1,
                                                  reduction_factor=2)
    else:
        scheduler = tune.schedulers.FIFOScheduler()
    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = tune.search.ConcurrencyLimiter(OptunaSearch(seed=options.seed), max_concurrent=concurrency)
    else:  # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own limit
        search_alg = tune.search.BasicVariantGenerator(random_state=options.seed, max_concurrent=concurrency)
    return tune.Tuner(
        trainable, param_space=to_tune(space),
        tune_config=tune.TuneConfig(metric=options.metric, mode=options.resolved_mode, num_samples=options.num_samples,
                                    scheduler=scheduler, search_alg=search_alg,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                                  callbacks=[SweepProgress(options.metric, options.resolved_mode, epochs,
                                                           _count_trials(space, options.num_samples), list(space),
                                                           enabled=progress)]),
    )


def _trial_name(trial) -> str:
    return trial_run_name(trial.trial_id)


def _collect(grid, base: ExperimentConfig, space: dict[str, Any], options: SweepOptions, name: str, sweep_dir: Path,
             data_dir: Path, uri: str, parent_id: str, started: float) -> SweepResult:
    """The trials table; child runs of trials the scheduler stopped (or that died) are closed with their
    end artifacts from their last checkpoint, so every child run ends up complete."""
    import pandas as pd

    metric, mode = options.metric, options.resolved_mode
    rows, curves = [], {}
    for result in grid:
        trial_id = _trial_id(result)
        run_dir = sweep_dir / TRIAL_RUNS / trial_run_name(trial_id)
        history = _history(result)
        status = "error" if result.error else ("finished" if history and history[-1].get("epoch", 0)
                                               >= base.train.epochs else "stopped early")
        child_id = _close_child(uri, base, result, run_dir, data_dir, status, history)
        # A trial stopped by the scheduler may finish (and log) an epoch whose report Tune never received:
        # the trial's own record, read from its last checkpoint, is the complete history.
        recorded = _recorded_history(run_dir)
        if len(recorded) > len(history):
            history = recorded
            if status != "error" and history[-1].get("epoch", 0) >= base.train.epochs:
                status = "finished"
        params = {k: result.config.get(k) for k in space}
        values = [h[metric] for h in history if metric in h]
        best = (max if mode == "max" else min)(values) if values else math.nan
        last = history[-1] if history else {}
        rows.append({"trial_id": trial_id, "status": status, **params, "epochs": int(last.get("epoch", 0)),
                     metric: last.get(metric, math.nan), f"best_{metric}": best,
                     "test_at_best_val": last.get("test_at_best_val", math.nan),
                     "test_accuracy": last.get("test_accuracy", math.nan), "mlflow_run_id": child_id,
                     "run_dir": str(run_dir)})
        curves[trial_id] = ([h["epoch"] for h in history if metric in h], values)
    table = pd.DataFrame(rows)
    best_id, best_params, best_cfg = None, {}, None
    if len(table) and table[f"best_{metric}"].notna().any():
        table = table.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last", kind="stable")
        table = table.reset_index(drop=True)
        best_id = table.iloc[0]["trial_id"]
        best_params = {k: _plain(table.iloc[0][k]) for k in space}
        best_cfg = base.with_values(best_params).with_values({"tracking.run_name": None})
    out = SweepResult(name=name, path=str(sweep_dir), metric=metric, mode=mode, trials=table, searched=list(space),
                      best_trial_id=best_id, best_config=best_cfg, parent_run_id=parent_id, tracking_uri=uri,
                      wall_s=time.time() - started, best_params=best_params, curves=curves)
    return out


def _recorded_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch history the trial itself recorded (its result file), [] if there is none."""
    path = run_dir / TRIAL_RESULT_FILE
    if not path.is_file():
        return []
    return [{k: _plain(v) for k, v in row.items()} for row in json.loads(path.read_text()).get("history") or []]


def _trial_id(result) -> str:
    """Tune's id of the trial behind `result`. Its directory name is not reliable: a trial re-created on resume
    whose directory the killed driver had already made gets Tune's 4-hex-digit suffix (`trial-ID_1a2b`)."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return str(reported)
    name = Path(result.path).name.removeprefix("trial-")
    suffixed = re.fullmatch(r"(.+_\d{5})_[0-9a-f]{4}", name)
    return suffixed.group(1) if suffixed else name


def _history(result) -> list[dict[str, Any]]:
    """Per-epoch rows Tune received, one per epoch (a trial restarted on resume may repeat an epoch)."""
    df = result.metrics_dataframe
    if df is None or not len(df) or "epoch" not in df:
        return []
    df = df.dropna(subset=["epoch"]).drop_duplicates(subset="epoch", keep="last").sort_values("epoch")
    return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]


def _close_child(uri: str, base: ExperimentConfig, result, run_dir: Path, data_dir: Path, status: str,
                 history: list[dict[str, Any]]) -> str | None:
    """The child run's id; closed here if its trial did not close it (stopped by the scheduler, or died).
    The driver alone closes unfinished children: a stopped trial fails inside `fit()` at a time of Ray's
    choosing, and a status it wrote could land after this one."""
    import ray.train

    from metacorrect.platform import tracking
    from metacorrect.platform.trainer import finish_run

    marker = run_dir / "mlflow_run.json"
    if not marker.is_file():
        return None
    run_id = json.loads(marker.read_text())["run_id"]
    run = tracking.client(uri).get_run(run_id)
    if run.info.status != "RUNNING":  # the trial finished and closed it (trials never close a failed run)
        return run_id
    cfg = base.with_values({k: _plain(v) for k, v in result.config.items()})
    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    checkpoint = ray.train.Checkpoint(path) if path and Path(path).exists() else None
    tracking.client(uri).set_tag(run_id, "sweep.trial_status", status)
    out = finish_run(cfg, checkpoint, name=run_dir.name, uri=uri, run_id=run_id, run_dir=run_dir,
                     data_dir=data_dir, started=run.info.start_time / 1000.0, status="FAILED" if status == "error" else "FINISHED")
    if status != "error" and not (run_dir / TRIAL_RESULT_FILE).is_file():
        write_trial_result(run_dir, out.history or history, out.checkpoint_path)
    return run_id


def _log_parent_start(uri: str, run_id: str, cfg: ExperimentConfig, space: dict[str, Any], options: SweepOptions,
                      data_dir: Path) -> None:
    from metacorrect.platform import tracking

    # The base config whole (every --set override included), less the searched fields: those are in
    # sweep.space, and each child run holds its own values.
    base = {k: v for k, v in cfg.flat().items() if k not in space}
    tracking.log_params(uri, run_id, base | {f"sweep.{k}": v for k, v in vars(options).items()}
                        | {"sweep.space": space, "data.resolved_path": str(data_dir)})
    c = tracking.client(uri)
    c.log_text(run_id, cfg.to_yaml(), "config.yaml")
    c.log_text(run_id, space_to_yaml(space), "space.yaml")


def _log_parent_end(result: SweepResult, space: dict[str, Any], base: ExperimentConfig) -> None:
    from metacorrect.platform import plots, tracking
    from metacorrect.platform.trainer import _close

    uri, run_id, metric = result.tracking_uri, result.parent_run_id, result.metric
    c = tracking.client(uri)
    c.log_text(run_id, result.trials.to_csv(index=False), "trials.csv")
    scored = result.trials[result.trials[f"best_{metric}"].notna()] if len(result.trials) else result.trials
    for key, spec in space.items():
        if len(scored):
            fig = plots.metric_vs_param(list(scored[key].map(_plain)), list(scored[f"best_{metric}"]), key,
                                        f"best {metric}", log_x="loguniform" in spec or "lograndint" in spec,
                                        labels=list(scored["trial_id"]))
            c.log_figure(run_id, fig, f"plots/{metric}_vs_{key}.png")
            _close(fig)
    curves = {k: v for k, v in result.curves.items() if v[0]}
    if curves:
        fig = plots.trial_curves(curves, metric, f"{metric} per epoch, {len(curves)} trials of {result.name}")
        c.log_figure(run_id, fig, "plots/learning_curves.png")
        _close(fig)
    if result.best_config is not None:
        c.log_text(run_id, result.best_config.to_yaml(), "best_config.yaml")
        tracking.log_metrics(uri, run_id, {f"best_{metric}": float(result.trials.iloc[0][f"best_{metric}"])}, step=0)
        c.set_tag(run_id, "sweep.best_trial", result.best_trial_id)
    c.set_tag(run_id, "sweep.trials", str(len(result.trials)))  # bookkeeping: tags, not charts
    c.set_tag(run_id, "wall_s", f"{result.wall_s:.1f}")
    tracking.end_run(uri, run_id, "FINISHED")


def format_trials(table, searched: list[str], metric: str) -> str:
    """The trials as a fixed-width text table, best first."""
    columns = ["trial_id", "status", *searched, "epochs", metric, f"best_{metric}", "test_at_best_val"]
    cells = [columns]
    for _, row in table.iterrows():
        cells.append([_cell(row.get(c)) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"
    return str(value)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (for YAML, JSON and MLflow)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value
