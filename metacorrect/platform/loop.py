"""The per-worker training loop that every Ray Train worker runs (and, with `num_workers: 0`, the driver or a
Tune trial runs itself)."""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import torch

from metacorrect.config import ExperimentConfig
from metacorrect.datasets.contract import read_meta
from metacorrect.datasets.stream import decoded_bytes
from metacorrect.methods import METHODS, Batch, MethodContext
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform import checkpoint as ckpt
from metacorrect.platform import quiet
from metacorrect.platform.batches import CleanCycle, Normaliser, empty_rows, iterate, to_batch
from metacorrect.platform.collective import Collective
from metacorrect.platform.evaluate import evaluate, evaluate_noisy
from metacorrect.platform.placement import Placement
from metacorrect.platform.global_batches import global_batches
from metacorrect.platform.epoch_position import ConsumedIds, EpochSums, read_positions, set_rng_state, write_position
from metacorrect.platform.precision import step_precision
from metacorrect.platform.records import MID_EPOCH, STEP_KEY, RunRecords, checkpoint_name


@dataclass
class RunContext:
    """What the driver resolved for the workers (absolute paths and URIs: workers run in other cwds)."""

    data_dir: str
    tracking_uri: str
    mlflow_run_id: str
    run_dir: str  # storage_path/name: Ray Train's run directory, where committed checkpoints live
    torch_threads: int
    local_checkpoints: str | None = None  # num_workers=0: our own committed checkpoints (Ray copies none)
    eval_ids_file: str | None = None  # train.eval_noisy: known, fewer than all rows: the measured noisy ids
    progress: bool = True  # one line per epoch from rank 0
    tune_reports: bool = False  # local mode in a Tune trial: each committed epoch is reported to Tune here


def make_optimizer(cfg: ExperimentConfig, model: torch.nn.Module):
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay, nesterov=o.nesterov)
    if o.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.train.epochs))
    elif o.schedule == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=o.milestones, gamma=o.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.from_dict(loop_config["experiment"])
    run = RunContext(**loop_config["run"])
    torch.set_num_threads(run.torch_threads)
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet.quiet_this_process()
    # local mode runs without Ray Train (its checkpoints are our own): placement and data from this process
    place = Placement.this_process() if run.local_checkpoints else Placement.train_worker()
    rank, world, device = place.rank, place.world, place.device
    datasets = loop_config["datasets"]

    def shard(name: str):
        return datasets.shard(name, place)

    collective = Collective.from_process_group(device)
    meta = read_meta(run.data_dir)
    norm = Normaliser.from_meta(meta, device)

    seed = cfg.train.seed
    torch.manual_seed(seed)  # same initial weights on every worker (then made identical by sync)
    model = build_backbone(cfg.model.arch, meta.num_classes, meta.image_shape, cfg.model.width,
                           cfg.model.pretrained).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # inputs arrive NHWC-strided already
    collective.sync_module_(model)
    optimizer, scheduler = make_optimizer(cfg, model)
    precision = step_precision(cfg.train.precision, device)
    method = METHODS[cfg.method.name](MethodContext(cfg, model, optimizer, meta.num_classes,
                                                    meta.counts["noisy_train"], collective, tuple(meta.image_shape)))

    train = cfg.train
    monitor = _system_monitor(cfg, run, place)
    records = RunRecords(run.run_dir, run.tracking_uri, run.mlflow_run_id, rank, run.local_checkpoints,
                         keep=train.keep_checkpoints, tune_reports=run.tune_reports)
    at = Position()
    best, history, step_history = {}, [], []
    resumed = None
    state = records.restore(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        if "loss_scales" in state:  # fp16 only
            method.loss_scales.load_state_dict(state["loss_scales"])
        best, history, step_history = state["best"], state["history"], state.get("step_history", [])
        at = Position(state["epoch"], state.get("steps_in_epoch", 0),
                      state.get("global_step", sum(int(h["steps"]) for h in history)))
        if at.steps_in_epoch:
            resumed = read_positions(state["positions"], rank, world, meta.counts["noisy_train"], device)
        if rank == 0 and run.progress:
            print(f"[metacorrect] resumed from the checkpoint of epoch {at.epoch}"
                  + (f", step {at.steps_in_epoch} of epoch {at.epoch + 1}" if at.steps_in_epoch else ""))

    local_bs = train.batch_size // world
    clean = CleanCycle(shard("clean"), train.clean_batch_size // world, device, norm, meta.counts["clean_train"],
                       seed=seed * 7919, augment=cfg.data.augment, set_bytes=decoded_bytes(meta, "clean_train"),
                       rank=rank, world=world)
    noisy_shard = shard("noisy")
    template = empty_rows(meta, device)
    trace = _IdTrace(train.trace_ids_dir, rank)
    measured = None  # train.eval_noisy: known on part of the noisy set: a mask of the measured ids
    if run.eval_ids_file:
        measured = torch.zeros(meta.counts["noisy_train"], dtype=torch.bool, device=device)
        measured[torch.from_numpy(np.load(run.eval_ids_file)).to(device)] = True

    def snapshot(epoch: int) -> dict[str, Any] | None:
        if rank != 0:
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "method": method.state_dict(), "epoch": epoch,
                 "steps_in_epoch": at.steps_in_epoch, "global_step": at.global_step, "best": best,
                 "history": history, "step_history": step_history, "config": cfg.to_dict()}
        if method.loss_scales.enabled:  # fp16: the scales and skip counts continue where they were
            state["loss_scales"] = method.loss_scales.state_dict()
        return state

    for epoch in range(at.epoch, train.epochs):
        _seed_everything(seed + 1000 * epoch + rank)  # per epoch, so a resumed run repeats the same draws
        clean.start_epoch(epoch)
        started = time.time()
        stream = iterate(noisy_shard, local_bs, device, cfg.data.shuffle_buffer, seed=seed * 1000 + epoch * 31 + rank)
        consumed, sums = ConsumedIds(meta.counts["noisy_train"], device), EpochSums()
        if resumed is not None:  # the rest of an epoch a step checkpoint stopped in
            consumed, sums = resumed.consumed, resumed.sums
            stream = consumed.skip(stream)
            last = clean.template()  # shapes for a stand-in; draws no batch and no random number
            if resumed.clean_position is not None:
                clean.seek(*resumed.clean_position)
            if resumed.rng is not None:  # the same world size: continue its generators exactly
                set_rng_state(resumed.rng)
            resumed = None
        else:
            at.steps_in_epoch = 0
            last = next(clean)  # shapes for a stand-in before this worker has had rows of its own
        method.start_epoch(epoch)
        window = StepWindow(started)
        views = method.strong_views if method.capabilities.strong_views else 0
        make_batch = (lambda raw: to_batch(raw, norm, cfg.data.augment, views,
                                           method.strong_augment)[0])
        method.model.train()
        checkpointed = at.global_step
        for raw in global_batches(stream, train.batch_size, collective, template):
            if train.checkpoint_every and at.global_step % train.checkpoint_every == 0 \
                    and at.global_step != checkpointed:  # before the next step: never at an epoch's end
                name = checkpoint_name(epoch, at.steps_in_epoch)
                records.commit(name, {"epoch": epoch, "global_step": at.global_step, MID_EPOCH: 1},
                               snapshot(epoch), position=lambda d: write_position(
                                   d, rank, consumed, sums, clean.position()),
                               rows=window.take_logged())
                checkpointed = at.global_step
            # A worker with no rows in a step (the epoch's last step can hold fewer rows than there are
            # workers) still steps, on a stand-in batch of weight 0: every step's collectives need every worker.
            noisy = replace(last, weight=0.0) if raw is None else make_batch(raw)
            if raw is not None:
                last = noisy
                consumed.mark(noisy.ids)
            trace.write(epoch, at.global_step + 1, noisy)
            started_step, meta_before = time.perf_counter(), method.meta_clock.seconds
            with precision:
                out = method.step(noisy, next(clean))
            if method.loss_scales.enabled:  # an overflowed loss or the gradient norm of a skipped step
                out = {k: v for k, v in out.items() if math.isfinite(v)}
            window.time(time.perf_counter() - started_step, method.meta_clock.seconds - meta_before)
            sums.add(out, noisy.weight)
            window.add(out, noisy.weight)
            at.steps_in_epoch += 1
            at.global_step += 1
            if train.log_every and at.global_step % train.log_every == 0:
                row = window.reduce(collective, device, at.global_step, optimizer.param_groups[0]["lr"],
                                    method.loss_scales.metrics())
                step_history.append(row)
        metrics = _reduce(sums, collective, device) | {"steps": at.steps_in_epoch} | method.loss_scales.metrics()
        train_time = time.time() - started
        scheduler.step()
        collective.sync_module_(model)  # identical BN running stats on every replica before eval/checkpoint
        evaluated, extras = _evaluate_epoch(cfg, method, meta, norm, collective, device, rank,
                                            last=epoch + 1 == train.epochs, shard=shard, measured=measured)
        metrics |= evaluated
        improved = False
        for prefix in [""] + [f"{name}_" for name in _eval_models(method)]:  # the student, then e.g. IEG's EMA
            if metrics.get(f"{prefix}val_accuracy", -1.0) > best.get(f"{prefix}best_val_accuracy", -1.0):
                best |= {f"{prefix}best_val_accuracy": metrics[f"{prefix}val_accuracy"],
                         f"{prefix}test_at_best_val": metrics.get(f"{prefix}test_accuracy", math.nan),
                         f"{prefix}best_epoch": epoch + 1}
                improved = improved or not prefix
        metrics |= best | {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                           "epoch_time_s": time.time() - started,
                           "train_samples_per_s": metrics["noisy_rows_seen"] / max(train_time, 1e-9)}
        history.append(metrics)
        if rank == 0 and run.progress:
            print("[metacorrect] " + _progress_line(cfg, metrics))
        at.steps_in_epoch = 0
        records.commit(checkpoint_name(epoch + 1), metrics, snapshot(epoch + 1), extras,
                       rows=window.take_logged() + [(epoch + 1, metrics)], best=improved)
    records.close()
    trace.close()
    if monitor is not None:
        monitor.finish()


def _system_monitor(cfg: ExperimentConfig, run: RunContext, place: Placement):
    """MLflow's system-metrics monitor on the first worker of each node (the process that runs the loop in local
    mode); its metrics carry the node's rank when the run spans several nodes."""
    if not cfg.tracking.system_metrics or place.local_rank != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.mlflow_run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                   resume_logging=True, tracking_uri=run.tracking_uri,
                                   node_id=f"node{place.node_rank}" if place.nodes else None)
    monitor.start()
    return monitor


@dataclass
class Position:
    epoch: int = 0  # epochs completed
    steps_in_epoch: int = 0  # steps trained in the current epoch
    global_step: int = 0


class StepWindow:
    """The step metrics since the last logged step, and the logged rows not yet handed to a checkpoint."""

    def __init__(self, started: float):
        self.sums, self.since, self.steps = EpochSums(), started, 0
        self.step_s = self.meta_s = 0.0
        self.logged: list[tuple[int, dict[str, float]]] = []

    def add(self, out: dict[str, float], weight: float) -> None:
        self.sums.add(out, weight)
        self.steps += 1

    def time(self, step_s: float, meta_s: float) -> None:
        """The wall time of a method step and of its meta part (`Method.meta_phase`)."""
        self.step_s += step_s
        self.meta_s += meta_s

    def reduce(self, collective: Collective, device, global_step: int, lr: float,
               totals_so_far: dict[str, float] | None = None) -> dict[str, float]:
        """The window's metrics over every worker, as a step row (also kept for the next checkpoint).
        `totals_so_far`: values that are the same on every worker, logged as they are (fp16's skip counts)."""
        totals = _reduce(self.sums, collective, device) | (totals_so_far or {})
        now = time.time()
        row = {f"step/{k}": v for k, v in totals.items() if k != "noisy_rows_seen"}
        row |= {"step/lr": lr, STEP_KEY: totals["noisy_rows_seen"] / max(now - self.since, 1e-9),
                "step/step_time_s": self.step_s / max(self.steps, 1),
                "step/meta_share": self.meta_s / max(self.step_s, 1e-12), "global_step": global_step}
        self.logged.append((global_step, {k: v for k, v in row.items() if k != "global_step"}))
        self.sums, self.since, self.steps = EpochSums(), now, 0
        self.step_s = self.meta_s = 0.0
        return row

    def take_logged(self) -> list[tuple[int, dict[str, float]]]:
        rows, self.logged = self.logged, []
        return rows


def _reduce(sums: EpochSums, collective: Collective, device) -> dict[str, float]:
    """Row-weighted means of the step metrics over every worker, and the rows that counted."""
    keys = collective.union(set(sums.sums))  # the same keys, in order, on every worker
    totals = collective.sum(torch.tensor([sums.sums.get(k, 0.0) for k in keys]
                                         + [sums.counted.get(k, 0.0) for k in keys] + [sums.weight],
                                         dtype=torch.float64, device=device))
    out = {k: float(totals[i] / totals[len(keys) + i]) for i, k in enumerate(keys) if totals[len(keys) + i] > 0}
    return out | {"noisy_rows_seen": int(totals[-1])}


class _IdTrace:
    """`train.trace_ids_dir`: every rank appends {epoch, step, ids} per step (auditing which rows trained)."""

    def __init__(self, directory: str | None, rank: int):
        self.file = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"ids-rank{rank}-pid{os.getpid()}.jsonl", "a")

    def write(self, epoch: int, step: int, batch: Batch) -> None:
        if self.file is not None:
            ids = batch.ids.tolist() if batch.weight else []
            self.file.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _eval_models(method) -> dict:
    """The further models a method declares (e.g. IEG's EMA weights), evaluated beside the student."""
    return method.eval_models() if method.capabilities.eval_models else {}


def _evaluate_epoch(cfg: ExperimentConfig, method, meta, norm: Normaliser, collective: Collective, device,
                    rank: int, last: bool, shard: Callable[[str], Any], measured: torch.Tensor | None = None
                    ) -> tuple[dict[str, float], dict[str, bytes]]:
    """Val/test accuracy, the model's label recovery on the noisy set and, for label-correcting methods,
    the accuracy of their corrected labels (exported with the last checkpoint)."""
    batch_size = cfg.train.eval_batch_size
    metrics = evaluate(method.model, shard("val"), norm, collective, batch_size, device, "val")
    metrics |= evaluate(method.model, shard("test"), norm, collective, batch_size, device, "test")
    for name, model in _eval_models(method).items():
        for split in ("val", "test"):
            metrics |= evaluate(model, shard(split), norm, collective, batch_size, device, f"{name}_{split}")
    extras: dict[str, bytes] = {}
    if last and rank == 0:  # the method's own tables (e.g. learned labels), logged to MLflow under labels/
        exported = method.export_files()
        extras |= exported
        if exported:
            extras[ckpt.EXPORTS_FILE] = json.dumps(sorted(exported)).encode()
    if cfg.train.eval_noisy == "off":
        return metrics, extras
    # `known` with fewer rows than the noisy set: those rows each epoch, and at the end one pass over every row
    # for the exports whose metrics count the same rows.
    split, counted = "noisy_eval", None
    if measured is not None:
        split, counted = ("noisy_eval", measured) if last else ("noisy_known", None)
    noisy_metrics, corrected, weights = evaluate_noisy(
        method, shard(split), norm, collective, batch_size, meta.num_classes, device,
        corrected=method.capabilities.corrects_labels, export=last, weights=method.capabilities.weighs_samples,
        counted=counted)
    metrics |= noisy_metrics
    if corrected is not None and rank == 0:
        extras[ckpt.LABEL_TRANSITION_FILE] = json.dumps(corrected.confusion.tolist()).encode()
        if corrected.rows is not None:
            extras[ckpt.CORRECTED_FILE] = ckpt.corrected_labels_parquet(corrected.rows)
    if weights is not None and rank == 0:
        extras[ckpt.WEIGHTS_FILE] = ckpt.sample_weights_parquet(weights)
    return metrics, extras


def _progress_line(cfg: ExperimentConfig, m: dict[str, float]) -> str:
    parts = [f"epoch {int(m['epoch'])}/{cfg.train.epochs}"]
    for key, label in (("train_loss", "loss"), ("val_accuracy", "val"), ("test_accuracy", "test"),
                       ("noisy_recovery", "recovery")):
        if key in m:
            parts.append(f"{label} {m[key]:.4f}")
    parts.append(f"{m['epoch_time_s']:.1f}s")
    return "  ".join(parts)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
