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

from metacorrect.platform.interrupts import UninterruptedClient, deferred

DEFAULT_DIR = "mlruns"
# The MLflow 3 UI opens an experiment on the view of its kind: a model-training experiment on its runs table
# (an experiment without the tag may be inferred to be a GenAI one and open on its traces page).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# The MLflow UI has no per-experiment default columns; its "share view" links (`?viewStateShareKey=KEY`) load a
# table state stored as the experiment tag `mlflow.sharedViewState.KEY`. Every experiment gets one such view:
# the researcher's columns (docs/mlflow.md).
VIEW_KEY = "metacorrect"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS = ([f"tags.`{t}`" for t in ("method", "noise_type", "noise_rate", "clean_size", "seed")]
                + [f"metrics.`{m}`" for m in ("val_accuracy", "test_accuracy", "best_val_accuracy",
                                             "test_at_best_val")] + ["attributes.`Models`"])
EXPERIMENT_NOTE = ("Runs of metacorrect: image classifiers trained on noisily-labelled data. Filter by the tags "
                   "method, source, noise_type, noise_rate, clean_size and seed; each run's description is its "
                   "config in one line.")
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
    """An MLflow client whose calls are not cut short by Ctrl-C or SIGTERM (`interrupts.deferred`)."""
    from mlflow.tracking import MlflowClient

    return UninterruptedClient(MlflowClient(tracking_uri=uri))


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created if new, as a model-training experiment (`EXPERIMENT_KIND`) with a
    description and the researcher's view of its runs table (`VIEW_TAG`); an existing experiment without a
    kind or that view gets them (a kind the user set is kept)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = _artifact_root(uri)
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE,
                VIEW_TAG: json.dumps({"selectedColumns": VIEW_COLUMNS})}
        try:
            return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=tags)
        except Exception:  # created concurrently by another process
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if VIEW_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, VIEW_TAG, json.dumps({"selectedColumns": VIEW_COLUMNS}))
    return exp.experiment_id


def view_path(experiment_id: str) -> str:
    """The UI's path (after the server's address) of the experiment's runs table with the researcher's columns,
    in the UI's "Model training" workflow (MLflow 3.17's UI opens every experiment in the workflow chosen in the
    browser, GenAI by default, whatever the experiment's kind)."""
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def runs_table_url(uri: str, run_id: str) -> str:
    """Where the runs table of `run_id`'s experiment opens: on the tracking server, or on `mlflow ui`'s default
    address for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return base + view_path(client(uri).get_run(run_id).info.experiment_id)


def start_run(uri: str, experiment: str, run_name: str, run_dir: Path, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of the training run in `run_dir`: reused when resuming, created otherwise.

    Returns (run_id, resumed). The id is kept in run_dir/mlflow_run.json so a resumed run keeps
    appending to the same MLflow run instead of creating a duplicate.
    """
    marker = Path(run_dir) / "mlflow_run.json"
    c = client(uri)
    if marker.is_file():  # its name and tags were set when it was created
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

    from metacorrect.platform.run_layout import metric_value

    now = int(time.time() * 1000)
    items = [Metric(k, metric_value(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
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
    """(step, metrics) rows in as few requests as MLflow allows (1,000 metrics each). Bookkeeping values
    (`run_layout.BOOKKEEPING`: epoch, best epoch, epoch time, ...) are set as tags, the rows' latest value
    each, first; the rest are metrics, rounded to `run_layout.SIGNIFICANT_DIGITS`."""
    from mlflow.entities import Metric, RunTag

    from metacorrect.platform.run_layout import is_bookkeeping, metric_value, tag_value

    now = int(time.time() * 1000)
    items, tags = [], {}
    for step, metrics in rows:
        for k, v in metrics.items():
            if not isinstance(v, (int, float)):
                continue
            if is_bookkeeping(k):
                tags[k] = tag_value(v)
            else:
                items.append(Metric(k, metric_value(v), now, step))
    c = client(uri)
    with deferred():  # the rows whole, whatever signal arrives meanwhile
        if tags:  # before the metrics: MLflow stores a batch's metrics and tags in separate transactions, and a
            # process killed between them (a trial its scheduler stops) must not leave the epoch's metrics, by
            # which `records.log_missing_epochs` knows the epoch is logged, without its tags
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for start in range(0, len(items), 1000):
            c.log_batch(run_id, metrics=items[start:start + 1000])


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


@contextlib.contextmanager
def parent_closed_on_failure(uri: str, parent_id: str) -> Iterator[None]:
    """A sweep's or bench's driver: an interrupt closes the parent and every child still RUNNING as KILLED (a
    `--resume` reopens them), any other error as FAILED; the exception propagates."""
    try:
        yield
    except KeyboardInterrupt:
        end_open_children(uri, parent_id, "KILLED")
        end_run(uri, parent_id, "KILLED")
        raise
    except Exception:
        end_open_children(uri, parent_id, "FAILED")
        end_run(uri, parent_id, "FAILED")
        raise


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
