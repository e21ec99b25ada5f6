"""metacorrect: meta-learning label correction on Ray, tracked in MLflow.

    import metacorrect
    result = metacorrect.run(metacorrect.ExperimentConfig())        # erm on noisy digits
    result = metacorrect.run("configs/digits_demo.yaml", ["method.name=clean_only"])
    sweep = metacorrect.sweep("configs/digits_mlc.yaml", num_samples=8)   # Ray Tune, MLflow parent run
    sweep.trials, sweep.best_config, sweep.save_best("best.yaml")
    board = metacorrect.bench("configs/suites/digits-quick.yaml").leaderboard    # every method, one protocol
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metacorrect.config import ConfigError, ExperimentConfig
    from metacorrect.platform.results import RunResult, load_results
    from metacorrect.tuning.sweep import SweepResult

# Imported on first use: every Ray worker process of a metacorrect driver imports this package for its setup
# hook (metacorrect.platform.workers), and most of them (Ray Train's controller and helper actors, Ray Data's
# tasks, idle workers) never need torch, which metacorrect.config pulls in: about 1.3 CPU-seconds per process.
_LAZY = {"ConfigError": "metacorrect.config", "ExperimentConfig": "metacorrect.config",
         "RunResult": "metacorrect.platform.results", "load_results": "metacorrect.platform.results"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'metacorrect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def run(config: ExperimentConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None,
        progress: bool = True) -> RunResult:
    """Train one method on one data set on Ray Train, tracked in MLflow.

    The config is validated whole before anything starts, the data set is prepared from `data.prepare` if
    it does not exist, and a run whose `tracking.run_name` already exists resumes from its last checkpoint.

    Args:
        config: an `ExperimentConfig`, the path of a YAML file, a dict of sections, or None for the defaults.
        overrides: dotted `key=value` strings applied on top, as `--set` does (e.g. `["optim.lr=0.1"]`).
        progress: print the project's progress lines (data set, run start, one line per epoch).

    Returns:
        The run's final metrics, per-epoch history, MLflow run id and latest checkpoint.

    Raises:
        ConfigError: the config is invalid (one line per problem); nothing was started.
    """
    from metacorrect.platform.trainer import run as _run

    return _run(config, overrides, progress)


def sweep(config: ExperimentConfig | str | Path | dict[str, Any] | None = None,
          space: dict[str, Any] | str | Path | None = None, num_samples: int = 8, **options: Any) -> SweepResult:
    """Search hyper-parameters with Ray Tune, each trial a full Ray Train run, tracked as nested MLflow runs.

    Args:
        config: as for `run`.
        space: a dict or YAML file mapping dotted fields to specs (`{"optim.lr": {"loguniform": [1e-3, 0.1]}}`);
            None searches the method's default space.
        num_samples: trials to draw (times each grid entry).
        **options: `scheduler` ("asha" or "fifo"), `search` ("random" or "optuna"), `metric` ("val_accuracy"
            or "val_loss"), `mode`, `max_concurrent_trials`, `resources_per_trial` (a dict of `resources.*`
            fields for every trial), `name`, `resume` (continue the sweep of that name), `overrides`, `seed`,
            `progress`.

    Returns:
        The sweep's result, with `trials` (a pandas DataFrame, best first), `best_config`,
            `save_best(path)` and `parent_run_id`.
    """
    from metacorrect.tuning.sweep import sweep as _sweep

    return _sweep(config, space, num_samples, **options)


def bench(suite, resume: bool = False, overrides=None, **options):
    """Run a benchmark suite on Ray Tune, one leaderboard in MLflow (see `metacorrect.tuning.bench.bench`)."""
    from metacorrect.tuning.bench import bench as _bench

    return _bench(suite, resume, overrides, **options)


__all__ = ["ConfigError", "ExperimentConfig", "RunResult", "bench", "load_results", "run", "sweep"]
