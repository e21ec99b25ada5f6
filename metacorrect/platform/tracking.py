"""MLflow for one training run: an absolute tracking URI, one run per training run, resumable.

Train and Tune change each worker's working directory, and MLflow 3's default store is
`sqlite:///mlflow.db` relative to it, so the driver resolves one absolute URI and passes it down.
All calls go through an explicit `MlflowClient` (no global active run to leak between runs).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_DIR = "mlruns"
DATASET_ATTEMPTS = 5  # log_dataset: concurrent first logs of one data set race in MLflow's store


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db; sqlite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DIR}/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    elif "://" not in uri:  # a plain directory: keep the database and artifacts inside it
        path = Path(uri).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path / 'mlflow.db'}"
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _artifact_root(uri: str) -> str | None:
    """With a local SQLite store, artifacts live beside the database (not relative to some worker's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None  # a tracking server decides


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment: str, run_name: str, run_dir: Path, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of the training run in `run_dir`: reused when resuming, created otherwise.

    Returns (run_id, resumed). The id is kept in run_dir/mlflow_run.json so a resumed run keeps
    appending to the same MLflow run instead of creating a duplicate.
    """
    marker = Path(run_dir) / "mlflow_run.json"
    c = client(uri)
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("tracking_uri") == uri:
            try:
                c.get_run(info["run_id"])
                c.update_run(info["run_id"], status="RUNNING")
                return info["run_id"], True
            except Exception:
                pass  # deleted in MLflow: start a new one
    exp_id = experiment_id(uri, experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags or {})
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri, "experiment": experiment}))
    return run.info.run_id, False


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in params.items()]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=items)


def log_dataset(uri: str, run_id: str, name: str, path: str, digest: str, context: str = "train") -> None:
    """The data set as the run's MLflow dataset input (name, digest of its noisy labels, source path): runs on
    the same noise realisation show the same digest in the UI. Metadata only; nothing is read or copied."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    # Data sets are prepared on the local or a mounted file system (data.path).
    dataset = MetaDataset(source=LocalArtifactDatasetSource(path), name=name, digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    for attempt in range(DATASET_ATTEMPTS):
        try:
            client(uri).log_inputs(run_id, datasets=inputs)
            return
        except MlflowException:
            # MLflow inserts the data set's record when its (experiment, name, digest) is new: runs that start
            # together (a sweep's trials) race to insert it, and the losers fail on the UNIQUE constraint. The
            # store rolled the attempt back; the next one finds the winner's record and only links it.
            if attempt == DATASET_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def log_rows(uri: str, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    """(step, metrics) rows in as few requests as MLflow allows (1,000 metrics each)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for step, metrics in rows for k, v in metrics.items()
             if isinstance(v, (int, float))]
    for start in range(0, len(items), 1000):
        client(uri).log_batch(run_id, metrics=items[start:start + 1000])


def logged_steps(uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which `key` has been logged in the run (one request)."""
    return {m.step for m in client(uri).get_metric_history(run_id, key)}


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def end_run_if_running(uri: str, run_id: str, status: str) -> None:
    """Close the run unless someone already did (e.g. a run that finished before the interrupt reached it)."""
    c = client(uri)
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status=status)


def end_open_children(uri: str, parent_id: str, status: str) -> int:
    """Close the still-RUNNING child runs of `parent_id` (a sweep interrupted or failed): none is left RUNNING,
    and a resume reopens each one. Returns how many were closed."""
    c = client(uri)
    experiment = c.get_run(parent_id).info.experiment_id
    open_children = c.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                                              f"and attributes.status = 'RUNNING'")
    for run in open_children:
        c.set_terminated(run.info.run_id, status=status)
    return len(open_children)


@contextlib.contextmanager
def closed_on_failure(uri: str, run_id: str) -> Iterator[None]:
    """A run that ends inside the block by interrupt (Ctrl-C, SIGTERM) is closed KILLED, by error FAILED:
    never left RUNNING. A later resume of the same name reopens it (`start_run`)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        end_run_if_running(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run_if_running(uri, run_id, "FAILED")
        raise


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:6000]
