"""Keep Ray's and MLflow's routine notices (dataset executions, report calls, set-up lines) out of the console.

Full logs still go to Ray's session log files; the console shows our one progress line per epoch
and Ray's warnings and errors. `--verbose` (METACORRECT_VERBOSE=1) keeps everything on the console.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import yaml

ENV = "RAY_DATA_LOGGING_CONFIG"
VERBOSE_ENV = "METACORRECT_VERBOSE"  # "1" (`--verbose`): keep Ray's and MLflow's own console notices
PROGRESS_LOGGER = "ray.data._internal.progress"


def ray_data_console_config() -> str:
    """Path of a Ray Data logging config whose console handler shows warnings only (for runtime_env)."""
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    # We turn Ray Data's bars off on purpose (one line per epoch is ours); its notice saying so is noise.
    config["loggers"][PROGRESS_LOGGER] = {"level": "ERROR"}
    path = Path(tempfile.gettempdir()) / f"metacorrect-ray-data-logging-{os.getuid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_this_process() -> None:
    if verbose():
        return
    # Ray Train's per-report INFO lines come from a logger named after its source file.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)  # "Running in local mode" (INFO)
    # torch's forward-mode AD (the meta-gradients' JVP) scripts its decompositions on first use, and torch 2.9
    # warns that scripting is deprecated: torch's own internals, nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.ERROR)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "started/terminated monitoring"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    # Ray Data warns that a dataset "will hang" whenever no CPU is free at the instant it starts; with trials
    # that run their loops themselves, another trial's data tasks briefly hold the CPUs a sweep leaves to Ray
    # Data (`resources.data_cpus`), and nothing hangs.
    dataset_logger = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _NoCpuNotice) for f in dataset_logger.filters):  # once per process
        dataset_logger.addFilter(_NoCpuNotice())
    for handler in logging.getLogger("ray.data").handlers:
        if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


class _NoCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def quiet_local_cluster_start() -> None:
    """Before `ray.init` starts a cluster of our own: Ray 2.60 turns token authentication on for it and says so
    at WARNING on every start; that is routine for a cluster only this process uses."""
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
