"""The per-worker training loop that every Ray Train worker runs (and `num_workers: 0` runs in the driver)."""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch

from metacorrect.config import ExperimentConfig
from metacorrect.datasets.contract import read_meta
from metacorrect.methods import METHODS, Batch
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform import checkpoint as ckpt
from metacorrect.platform import quiet
from metacorrect.platform.batches import CleanCycle, Normaliser, empty_rows, iterate, to_batch
from metacorrect.platform.collective import Collective
from metacorrect.platform.evaluate import evaluate, evaluate_noisy
from metacorrect.platform.global_batches import global_batches
from metacorrect.platform.records import RunRecords


@dataclass
class RunContext:
    """What the driver resolved for the workers (absolute paths and URIs: workers run in other cwds)."""

    data_dir: str
    tracking_uri: str
    mlflow_run_id: str
    run_dir: str  # storage_path/name: Ray Train's run directory, where committed checkpoints live
    torch_threads: int
    local_checkpoints: str | None = None  # num_workers=0: our own committed checkpoints (Ray copies none)
    progress: bool = True  # one line per epoch from rank 0


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
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    collective = Collective.from_process_group(device)
    meta = read_meta(run.data_dir)
    norm = Normaliser.from_meta(meta, device)

    seed = cfg.train.seed
    torch.manual_seed(seed)  # same initial weights on every worker (then made identical by sync)
    model = build_backbone(cfg.model.arch, meta.num_classes, meta.image_shape, cfg.model.width,
                           cfg.model.pretrained).to(device)
    collective.sync_module_(model)
    optimizer, scheduler = make_optimizer(cfg, model)
    method = METHODS[cfg.method.name](cfg, model, optimizer, meta.num_classes, meta.counts["noisy_train"], collective,
                                      image_shape=tuple(meta.image_shape))

    records = RunRecords(run.run_dir, run.tracking_uri, run.mlflow_run_id, rank, run.local_checkpoints)
    start_epoch, best, history = 0, {}, []
    state = records.restore(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        if rank == 0 and run.progress:
            print(f"[metacorrect] resumed from the checkpoint of epoch {start_epoch}")

    local_bs = cfg.train.batch_size // world
    clean = CleanCycle(ray.train.get_dataset_shard("clean"), cfg.train.clean_batch_size // world, device, norm,
                       meta.counts["clean_train"], seed=seed * 7919 + rank * 104729, augment=cfg.data.augment)
    noisy_shard = ray.train.get_dataset_shard("noisy")
    template = empty_rows(meta, device)
    for epoch in range(start_epoch, cfg.train.epochs):
        _seed_everything(seed + 1000 * epoch + rank)  # per epoch, so a resumed run repeats the same draws
        clean.start_epoch(epoch)
        started = time.time()
        stream = iterate(noisy_shard, local_bs, device, cfg.data.shuffle_buffer, seed=seed * 1000 + epoch * 31 + rank)
        method.start_epoch(epoch)
        metrics = _train_epoch(method, global_batches(stream, cfg.train.batch_size, collective, template), clean,
                               collective, device,
                               lambda raw: to_batch(raw, norm, cfg.data.augment, method.strong_views,
                                                    method.strong_augment)[0])
        train_time = time.time() - started
        scheduler.step()
        collective.sync_module_(model)  # identical BN running stats on every replica before eval/checkpoint
        evaluated, extras = _evaluate_epoch(cfg, method, meta, norm, collective, device, rank,
                                            last=epoch + 1 == cfg.train.epochs)
        metrics |= evaluated
        for prefix in [""] + [f"{name}_" for name in method.eval_models()]:  # the student, then e.g. IEG's EMA
            if metrics.get(f"{prefix}val_accuracy", -1.0) > best.get(f"{prefix}best_val_accuracy", -1.0):
                best |= {f"{prefix}best_val_accuracy": metrics[f"{prefix}val_accuracy"],
                         f"{prefix}test_at_best_val": metrics.get(f"{prefix}test_accuracy", math.nan),
                         f"{prefix}best_epoch": epoch + 1}
        metrics |= best | {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                           "epoch_time_s": time.time() - started,
                           "train_samples_per_s": metrics["noisy_rows_seen"] / max(train_time, 1e-9)}
        history.append(metrics)
        if rank == 0 and run.progress:
            print("[metacorrect] " + _progress_line(cfg, metrics))
        state = None
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "method": method.state_dict(), "epoch": epoch + 1,
                     "best": best, "history": history, "config": cfg.to_dict()}
        records.commit(epoch + 1, metrics, state, extras)
    records.close()


def _train_epoch(method, rows, clean: CleanCycle, collective: Collective, device,
                 make_batch: Callable[[dict[str, torch.Tensor]], Batch]) -> dict[str, float]:
    """One epoch of global batches; step metrics averaged over the rows that count.

    A worker with no rows in a step (the epoch's last step can hold fewer rows than there are workers) still
    steps, on a stand-in batch of weight 0, because every step's collectives need every worker."""
    method.model.train()
    sums: dict[str, float] = {}  # per key: sum of value x rows, and rows (a key may skip steps)
    counted: dict[str, float] = {}
    weight, steps = 0.0, 0
    last = next(clean)  # shapes for a stand-in before this worker has had rows of its own
    for raw in rows:
        if raw is None:
            noisy = replace(last, weight=0.0)
        else:
            noisy = last = make_batch(raw)
        out = method.step(noisy, next(clean))
        steps += 1
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v * noisy.weight
            counted[k] = counted.get(k, 0.0) + noisy.weight
        weight += noisy.weight
    keys = collective.union(set(sums))  # the same keys, in order, on every worker
    totals = collective.sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [counted.get(k, 0.0) for k in keys]
                                         + [weight], dtype=torch.float64, device=device))
    metrics = {k: float(totals[i] / totals[len(keys) + i]) for i, k in enumerate(keys) if totals[len(keys) + i] > 0}
    return metrics | {"steps": steps, "noisy_rows_seen": int(totals[-1])}


def _evaluate_epoch(cfg: ExperimentConfig, method, meta, norm: Normaliser, collective: Collective, device,
                    rank: int, last: bool) -> tuple[dict[str, float], dict[str, bytes]]:
    """Val/test accuracy, the model's label recovery on the noisy set and, for label-correcting methods,
    the accuracy of their corrected labels (exported with the last checkpoint)."""
    batch_size = cfg.train.eval_batch_size
    metrics = evaluate(method.model, ray.train.get_dataset_shard("val"), norm, collective, batch_size, device, "val")
    metrics |= evaluate(method.model, ray.train.get_dataset_shard("test"), norm, collective, batch_size, device,
                        "test")
    for name, model in method.eval_models().items():
        for split in ("val", "test"):
            metrics |= evaluate(model, ray.train.get_dataset_shard(split), norm, collective, batch_size, device,
                                f"{name}_{split}")
    extras: dict[str, bytes] = {}
    if last and rank == 0:  # the method's own tables (e.g. learned labels), logged to MLflow under labels/
        exported = method.export_files()
        extras |= exported
        if exported:
            extras[ckpt.EXPORTS_FILE] = json.dumps(sorted(exported)).encode()
    if not cfg.train.eval_noisy_train:
        return metrics, extras
    noisy_metrics, corrected, weights = evaluate_noisy(
        method, ray.train.get_dataset_shard("noisy_eval"), norm, collective, batch_size, meta.num_classes, device,
        corrected=method.corrects_labels, export=last, weights=method.weights_samples)
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
