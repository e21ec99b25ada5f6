"""metacorrect: meta-learning label correction on Ray, tracked in MLflow.

    import metacorrect
    result = metacorrect.run(metacorrect.ExperimentConfig())        # erm on noisy digits
    result = metacorrect.run("configs/digits_demo.yaml", ["method.name=clean_only"])
"""
from metacorrect.config import ConfigError, ExperimentConfig
from metacorrect.platform.results import RunResult, load_results


def run(config=None, overrides=None, progress: bool = True) -> RunResult:
    """Train one method (see `metacorrect.platform.trainer.run`)."""
    from metacorrect.platform.trainer import run as _run

    return _run(config, overrides, progress)


__all__ = ["ConfigError", "ExperimentConfig", "RunResult", "load_results", "run"]
