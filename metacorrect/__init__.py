"""metacorrect: meta-learning label correction on Ray, tracked in MLflow.

    import metacorrect
    result = metacorrect.run(metacorrect.ExperimentConfig())        # erm on noisy digits
    result = metacorrect.run("configs/digits_demo.yaml", ["method.name=clean_only"])
    sweep = metacorrect.sweep("configs/digits_mlc.yaml", num_samples=8)   # Ray Tune, MLflow parent run
    sweep.trials, sweep.best_config, sweep.save_best("best.yaml")
    board = metacorrect.bench("configs/suites/digits-quick.yaml").leaderboard    # every method, one protocol
"""
from metacorrect.config import ConfigError, ExperimentConfig
from metacorrect.platform.results import RunResult, load_results


def run(config=None, overrides=None, progress: bool = True) -> RunResult:
    """Train one method (see `metacorrect.platform.trainer.run`)."""
    from metacorrect.platform.trainer import run as _run

    return _run(config, overrides, progress)


def sweep(config=None, space=None, num_samples: int = 8, **options):
    """Search hyper-parameters with Ray Tune, each trial a Ray Train run (see `metacorrect.tuning.sweep.sweep`)."""
    from metacorrect.tuning.sweep import sweep as _sweep

    return _sweep(config, space, num_samples, **options)


def bench(suite, resume: bool = False, overrides=None, **options):
    """Run a benchmark suite on Ray Tune, one leaderboard in MLflow (see `metacorrect.tuning.bench.bench`)."""
    from metacorrect.tuning.bench import bench as _bench

    return _bench(suite, resume, overrides, **options)


__all__ = ["ConfigError", "ExperimentConfig", "RunResult", "bench", "load_results", "run", "sweep"]
