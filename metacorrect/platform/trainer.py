"""The driver side of a run: data ready, Ray up, MLflow run opened, `TorchTrainer.fit()`, artifacts logged."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
from ray.data.dataset import MaterializedDataset

from metacorrect.config import DataConfig, ExperimentConfig
from metacorrect.datasets.contract import DataError, DatasetMeta, read_meta
from metacorrect.datasets.labels import known_subset, label_digest
from metacorrect.datasets.noise import parse_noise
from metacorrect.datasets.prepare import prepare
from metacorrect.datasets.stream import decoded_bytes, open_split
from metacorrect.datasets.validate import check_dataset
from metacorrect.platform import checkpoint as ckpt
from metacorrect.platform import interrupts, plots, run_layout, tracking
from metacorrect.platform.cluster import ensure_ray
from metacorrect.platform.data_config import ExactSplitDataConfig, RunDatasets
from metacorrect.platform.failure_policy import FAILURES_FILE, one_line, root_error
from metacorrect.platform.torch_trainer import Trainer
from metacorrect.platform.loop import RunContext, train_loop_per_worker
from metacorrect.platform.records import log_missing_epochs
from metacorrect.platform.results import RunResult

SPLIT_ACROSS_WORKERS = ["noisy", "noisy_eval", "noisy_known", "val", "test"]
EVAL_IDS_FILE = "eval_noisy_ids.npy"  # in the run directory: the noisy ids `train.eval_noisy: known` measures


class RunFailed(RuntimeError):
    pass


def as_config(config: ExperimentConfig | str | Path | dict[str, Any] | None,
              overrides: list[str] | None = None) -> ExperimentConfig:
    if config is None:
        config = ExperimentConfig()
    if isinstance(config, (str, Path)):
        return ExperimentConfig.from_yaml(config, overrides)
    if isinstance(config, dict):
        config = ExperimentConfig.from_dict(config)
    return config.with_overrides(overrides) if overrides else config


def ensure_dataset(data: DataConfig, progress: bool = True) -> tuple[Path, DatasetMeta]:
    """The prepared data set of `data`; prepared first if the directory does not exist yet."""
    path = data.resolved_path()
    p = data.prepare
    if not path.exists():
        prepare(p.source, path, noise=p.noise, clean_per_class=p.clean_per_class, val_per_class=p.val_per_class,
                test_fraction=p.test_fraction, seed=p.seed, options=p.options, progress=progress)
    meta = read_meta(path)
    check_dataset(path, meta)  # before Ray starts: damaged shards and bad labels are one line, exit 2
    if not data.path:  # a derived path must hold what `data.prepare` describes
        expected = {"source": p.source, "noise": parse_noise(p.noise).to_string(), "seed": p.seed,
                    "clean_per_class": p.clean_per_class, "val_per_class": p.val_per_class,
                    "options": dict(p.options)}
        found = {"source": meta.source, "noise": meta.noise, "seed": meta.seed, **{
            k: meta.prepare_args.get(k) for k in ("clean_per_class", "val_per_class", "options")}}
        diff = [f"{k}={found[k]!r} (config: {expected[k]!r})" for k in expected if found[k] != expected[k]]
        if diff:
            raise DataError(f"{path}: was prepared with {', '.join(diff)}; delete it or set data.path")
    return path, meta


def run(config: ExperimentConfig | str | Path | dict[str, Any] | None = None,
        overrides: list[str] | None = None, progress: bool = True) -> RunResult:
    """Train one method on one data set on Ray Train, tracked in MLflow; resumes a run of the same name."""
    cfg = as_config(config, overrides)
    started = time.time()
    data_dir, meta = ensure_trainable_dataset(cfg.data, progress)
    ensure_ray()

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    storage = Path(cfg.tracking.storage_path).expanduser().resolve()
    name = cfg.tracking.run_name or run_layout.run_name(cfg, meta, taken=lambda n: (storage / n).exists())
    run_dir = storage / name
    run_id, resumed = open_tracked_run(uri, cfg, meta, data_dir, name, run_dir)
    with tracking.closed_on_failure(uri, run_id):
        if progress:
            print(f"[metacorrect] {'resuming' if resumed else 'starting'} run {name}: {cfg.method.name} on "
                  f"{meta.name} ({meta.counts['noisy_train']} noisy, {meta.counts['clean_train']} clean), "
                  f"{cfg.resources.num_workers} worker(s)")
        trainer = build_trainer(cfg, data_dir, meta, name=name, storage=storage, uri=uri, run_id=run_id,
                                progress=progress)
        result = fit_tracked(trainer, uri, run_id, name, run_dir)
        return finish_run(cfg, result.checkpoint, name=name, uri=uri, run_id=run_id, run_dir=run_dir,
                          data_dir=data_dir, started=started)


def ensure_trainable_dataset(data: DataConfig, progress: bool = True) -> tuple[Path, DatasetMeta]:
    """`ensure_dataset`, and a data set every method can train on."""
    data_dir, meta = ensure_dataset(data, progress)
    if meta.counts["clean_train"] == 0:  # every step draws a clean batch (erm mixes it in, meta methods learn on it)
        raise DataError(f"{data_dir}: no clean_train split; prepare the data set with --clean-per-class > 0")
    return data_dir, meta


def open_tracked_run(uri: str, cfg: ExperimentConfig, meta: DatasetMeta, data_dir: Path, name: str, run_dir: Path,
                     tags: dict[str, str] | None = None, mlflow_name: str | None = None) -> tuple[str, bool]:
    """The MLflow run of training run `name` (reused when resuming, else created with the tags of
    `run_layout.run_tags`, params and start artifacts), named `mlflow_name` (default `name`) in MLflow.
    Returns (run_id, resumed)."""
    run_id, resumed = tracking.start_run(uri, cfg.tracking.experiment, mlflow_name or name, run_dir,
                                         tags=run_layout.run_tags(cfg, meta) | (tags or {}))
    if not resumed:
        _log_start(uri, run_id, cfg, meta, data_dir)
    return run_id, resumed


def build_trainer(cfg: ExperimentConfig, data_dir: Path, meta: DatasetMeta, *, name: str, storage: Path, uri: str,
                  run_id: str, callbacks: list[Any] | None = None, progress: bool = True,
                  tune_reports: bool = False) -> Trainer:
    """The `TorchTrainer` of one run (Ray must be up): the same `storage/name` resumes from its checkpoint.
    `callbacks` are Ray Train's (they see the workers' reports); `tune_reports`: in local mode, the loop itself
    reports each epoch to the Tune trial it runs in (Ray Train calls no callback then)."""
    workers = cfg.resources.num_workers
    cpus = _cpus_per_worker(cfg)
    eval_ids = _measured_noisy_ids(cfg, data_dir, storage / name)
    datasets = _datasets(cfg, data_dir, meta, eval_ids)
    data_config = ExactSplitDataConfig(SPLIT_ACROSS_WORKERS, deterministic=cfg.data.deterministic)
    cached = {k: ds for k, ds in datasets.items() if isinstance(ds, MaterializedDataset)}
    streamed = {k: ds for k, ds in datasets.items() if k not in cached}
    context = RunContext(
        data_dir=str(data_dir), tracking_uri=uri, mlflow_run_id=run_id, run_dir=str(storage / name),
        torch_threads=max(1, math.floor(cpus)),
        eval_ids_file=str(storage / name / EVAL_IDS_FILE) if eval_ids is not None else None,
        local_checkpoints=None if workers else str(storage / name / "local_checkpoints"), progress=progress,
        tune_reports=tune_reports and not workers)
    resources = {"CPU": cpus} | ({"GPU": cfg.resources.gpus_per_worker} if cfg.resources.use_gpu else {})
    return Trainer(
        train_loop_per_worker,
        journal=storage / name / FAILURES_FILE,
        train_loop_config={"experiment": cfg.to_dict(), "run": vars(context),
                           "datasets": RunDatasets(cached, data_config, None if workers else streamed)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.resources.use_gpu,
                                               resources_per_worker=resources if workers else None),
        datasets=streamed if workers else {},  # through Ray Train's dataset machinery to its workers
        dataset_config=data_config,
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks),
    )


def fit_tracked(trainer: Trainer, uri: str, run_id: str, name: str, run_dir: Path,
                close_on_failure: bool = True) -> ray.train.Result:
    """`trainer.fit()`; a failure raises one-line `RunFailed` and, with `close_on_failure`, ends the MLflow run
    as FAILED (an interrupt propagates, and the caller closes the run as KILLED). A sweep trial passes False:
    its driver owns the child run's status, since a trial its scheduler stops also fails inside `fit()`."""
    try:
        return trainer.fit()
    except Exception as e:
        if close_on_failure:
            tracking.end_run_if_running(uri, run_id, "FAILED")
        raise RunFailed(f"run {name} failed: {one_line(root_error(e))} (MLflow run {run_id}, Ray Train logs "
                        f"and {FAILURES_FILE} under {run_dir})") from e


def finish_run(cfg: ExperimentConfig, checkpoint: ray.train.Checkpoint | None, *, name: str, uri: str, run_id: str,
               run_dir: Path, data_dir: Path, started: float, status: str = "FINISHED") -> RunResult:
    """The run's result read from its latest checkpoint; end artifacts logged and the MLflow run closed."""
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as ckpt_dir:
        history = ckpt.load_history(ckpt_dir) if ckpt_dir else []
        # Epochs and steps committed but not yet logged when the loop ended (e.g. a sweep trial stopped by its
        # scheduler, or the last logging cut short when the workers were shut down).
        log_missing_epochs(uri, run_id, history, ckpt.load_step_history(ckpt_dir) if ckpt_dir else [])
        out = RunResult(run_name=name, method=cfg.method.name, metrics=history[-1] if history else {},
                        history=history, mlflow_run_id=run_id, tracking_uri=uri,
                        checkpoint_path=checkpoint.path if checkpoint else None,
                        run_dir=str(run_dir), data_dir=str(data_dir), wall_s=time.time() - started,
                        config=cfg.to_dict())
        _log_end(uri, run_id, cfg, out, ckpt_dir, status)
    return out


def _measured_noisy_ids(cfg: ExperimentConfig, data_dir: Path, run_dir: Path) -> np.ndarray | None:
    """`train.eval_noisy: known`: the noisy ids measured each epoch when they are fewer than all noisy rows
    (written to the run directory for the workers); None when every row is measured or none is. The same
    subset for every method on the same data set (seed 0), so their curves compare."""
    if cfg.train.eval_noisy != "known":
        return None
    ids, _, total = known_subset(data_dir, "noisy_train", cfg.train.eval_noisy_max, seed=0)
    if len(ids) == total:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    scratch = run_dir / f".{EVAL_IDS_FILE}.tmp"
    with open(scratch, "wb") as f:
        np.save(f, ids)
    scratch.replace(run_dir / EVAL_IDS_FILE)
    return ids


def _datasets(cfg: ExperimentConfig, data_dir: Path, meta: DatasetMeta,
              eval_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Ray Datasets for the workers. Splits that fit `data.cache_mb` once decoded are materialised in the
    object store: each epoch then iterates them in milliseconds instead of re-reading and re-decoding
    (a pipeline start costs ~1-2 s here, which dominates small splits)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one line per epoch is ours to print
    context.execution_options.preserve_order = cfg.data.deterministic  # also fixes the cached block order
    splits = {"noisy": "noisy_train", "clean": "clean_train", "val": "val", "test": "test"}
    if cfg.train.eval_noisy != "off":  # every row: each epoch (`all`), or once at the end for the exports
        splits["noisy_eval"] = "noisy_train"
    budget = cfg.data.cache_mb * 2**20
    cached: dict[str, Any] = {}
    out = {}
    for name, split in splits.items():
        if split in cached:
            out[name] = cached[split]
            continue
        ds = open_split(data_dir, split, meta, shuffle_files=name == "noisy")
        if decoded_bytes(meta, split) <= budget:
            budget -= decoded_bytes(meta, split)
            ds = cached[split] = ds.materialize()
        out[name] = ds
    if eval_ids is not None:  # the measured rows alone, dropped before decoding
        ds = open_split(data_dir, "noisy_train", meta, ids=eval_ids)
        size = len(eval_ids) * (int(np.prod(meta.image_shape)) + 32)
        out["noisy_known"] = ds.materialize() if size <= budget else ds
    return out


def _cpus_per_worker(cfg: ExperimentConfig) -> float:
    r = cfg.resources
    if r.cpus_per_worker is not None:
        return r.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 1.0)
    share = (total - r.data_cpus) / max(1, r.num_workers)
    # Leave `data_cpus` to Ray Data (2 workers x 1 CPU on 2 cores would starve the stream); GPU workers
    # mostly feed the device, so they keep one CPU and the rest goes to decoding.
    return max(0.25, min(math.floor(share * 4) / 4, 1.0 if r.use_gpu else 8.0))


def _log_start(uri: str, run_id: str, cfg: ExperimentConfig, meta: DatasetMeta, data_dir: Path) -> None:
    c = tracking.client(uri)
    tracking.log_params(uri, run_id, cfg.flat() | {"data.resolved_path": str(data_dir),
                                                    "data.actual_noise_rate": meta.actual_noise_rate})
    c.log_text(run_id, cfg.to_yaml(), "config.yaml")
    c.log_text(run_id, (data_dir / "meta.json").read_text(), "data/meta.json")
    tracking.log_dataset(uri, run_id, meta.name, str(data_dir), label_digest(data_dir))
    fig = plots.transition_heatmap(np.array(meta.transition), meta.class_names,
                                   f"noise transition T[true, noisy]: {meta.noise}")
    c.log_figure(run_id, fig, "plots/noise_transition.png")
    _close(fig)


def _log_end(uri: str, run_id: str, cfg: ExperimentConfig, result: RunResult, ckpt_dir: str | None,
             status: str = "FINISHED") -> None:
    c = tracking.client(uri)
    if result.history:
        fig = plots.learning_curves(result.history, f"{cfg.method.name} on {Path(result.data_dir).name}")
        c.log_figure(run_id, fig, "plots/learning_curves.png")
        _close(fig)
    if ckpt_dir and (Path(ckpt_dir) / ckpt.LABEL_TRANSITION_FILE).is_file():
        counts = np.array(json.loads((Path(ckpt_dir) / ckpt.LABEL_TRANSITION_FILE).read_text()))
        rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        fig = plots.transition_heatmap(rows, json.loads((Path(result.data_dir) / "meta.json").read_text())["class_names"],
                                       f"learned labels of {cfg.method.name}: P(corrected | true)",
                                       xlabel="corrected label")
        c.log_figure(run_id, fig, "plots/label_transition.png")
        _close(fig)
        c.log_text(run_id, json.dumps(counts.tolist()), "labels/label_transition_counts.json")
    if ckpt_dir and (Path(ckpt_dir) / ckpt.CORRECTED_FILE).is_file():
        c.log_artifact(run_id, str(Path(ckpt_dir) / ckpt.CORRECTED_FILE), "labels")
    if ckpt_dir and (Path(ckpt_dir) / ckpt.EXPORTS_FILE).is_file():
        for name in json.loads((Path(ckpt_dir) / ckpt.EXPORTS_FILE).read_text()):
            c.log_artifact(run_id, str(Path(ckpt_dir) / name), "labels")
    if ckpt_dir and (Path(ckpt_dir) / ckpt.WEIGHTS_FILE).is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(Path(ckpt_dir) / ckpt.WEIGHTS_FILE).to_pandas()
        fig = plots.weight_histogram(table["weight"].to_numpy(), table["corrupted"].to_numpy(),
                                     f"per-sample weights of {cfg.method.name}, last epoch")
        c.log_figure(run_id, fig, "plots/sample_weights.png")
        _close(fig)
        c.log_artifact(run_id, str(Path(ckpt_dir) / ckpt.WEIGHTS_FILE), "weights")
    if cfg.tracking.log_model and ckpt_dir:
        model_file = Path(ckpt_dir) / ckpt.MODEL_FILE
        if model_file.is_file():
            c.log_artifact(run_id, str(model_file), "model")
    if cfg.tracking.register_model and ckpt_dir and (Path(ckpt_dir) / ckpt.MODEL_FILE).is_file():
        register_model(uri, run_id, cfg, result, Path(ckpt_dir) / ckpt.MODEL_FILE)
    c.set_tag(run_id, "wall_s", run_layout.tag_value(round(result.wall_s, 1)))  # bookkeeping: a tag, not a chart
    tracking.end_run(uri, run_id, status)


REGISTERED_TAG = "registered_model"  # on the run: NAME/VERSION of the model version it registered


def register_model(uri: str, run_id: str, cfg: ExperimentConfig, result: RunResult, model_file: Path) -> str | None:
    """`tracking.register_model: NAME`: the final student (the last checkpoint's model) logged as the run's
    MLflow model (PyTorch flavour, linked to the run's metrics of its last epoch) and registered as a new
    version of NAME. Once per run: a run that finishes again (re-run by name) keeps its version.
    Returns "NAME/VERSION"."""
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import Schema, TensorSpec

    from metacorrect.methods.backbones import build_backbone

    c = tracking.client(uri)
    run = c.get_run(run_id)
    if REGISTERED_TAG in run.data.tags:
        return run.data.tags[REGISTERED_TAG]
    meta = read_meta(result.data_dir)
    model = build_backbone(cfg.model.arch, meta.num_classes, meta.image_shape, cfg.model.width, None)
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    model.eval()
    height, width, channels = meta.image_shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, height, width))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta.num_classes))]))
    name = cfg.tracking.register_model
    with _use_tracking_uri(uri), interrupts.deferred():
        # Created here, in the run's experiment (MLflow's fluent call would pick the default experiment).
        logged = c.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                       params=run.data.params, model_type="image-classifier",
                                       tags={"method": cfg.method.name, "dataset": meta.name})
        info = mlflow.pytorch.log_model(
            model, name="model", model_id=logged.model_id, run_id=run_id, step=int(result.metrics.get("epoch", 0)),
            registered_model_name=name, signature=signature,
            # MLflow's default format, a torch.export graph: loads without metacorrect's code. Traced on a batch
            # of 2 so the batch dimension stays dynamic.
            input_example=np.zeros((2, channels, height, width), dtype=np.float32),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"input": "float32 (N, C, H, W): (pixels / 255 - pixel_mean) / pixel_std",
                      "pixel_mean": meta.pixel_mean, "pixel_std": meta.pixel_std,
                      "class_names": meta.class_names, "arch": cfg.model.arch, "width": cfg.model.width})
    registered = f"{name}/{info.registered_model_version}"
    c.set_tag(run_id, REGISTERED_TAG, registered)
    return registered


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
