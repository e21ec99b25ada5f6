"""`metacorrect data prepare`: any source -> the canonical parquet data set (contract.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metacorrect.datasets.codec import decode_images
from metacorrect.datasets.contract import DatasetMeta, DataError, SPLITS
from metacorrect.datasets.noise import apply_noise, empirical_transition, parse_noise
from metacorrect.datasets.shards import DEFAULT_SHARD_BYTES, ShardWriter, atomic_directory
from metacorrect.datasets.resumable import finalize, open_work_dir, plan_shards, run_shards, work_dir_of
from metacorrect.datasets.sources import FileSourceData, Pool, load_source
from metacorrect.datasets.sources.base import SourceData
from metacorrect.datasets.splits import split_pool

CHUNK = 2048
STATS_SAMPLE = 4096
# Generated pools at least this large are prepared on Ray, shard by shard, resumable (resumable.py); smaller
# ones in this process, where starting Ray would cost more than it saves.
PARALLEL_FROM = 100_000


@dataclass
class SplitPlan:
    pool: Pool
    indices: np.ndarray  # into pool
    labels: np.ndarray  # what methods see
    true_labels: np.ndarray  # -1 unknown


def prepare(source: str, out: str | Path, noise: str = "none", clean_per_class: int = 10,
            val_per_class: int = 20, test_fraction: float = 0.2, seed: int = 0,
            options: dict[str, Any] | None = None, overwrite: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, limit: int | None = None,
            workers: int | None = None) -> DatasetMeta:
    """Prepare a data set at `out`; the directory appears only once it is complete.

    `limit` keeps the first `limit` images of each pool or list (to try a subset); `workers` caps the
    parallel Ray tasks of image-folder sources (default: one per CPU of the cluster).
    """
    out = Path(out).resolve()
    spec = parse_noise(noise)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (pass --overwrite to replace it)")
    if limit is not None and limit < 1:
        raise DataError(f"limit: must be >= 1, got {limit}")
    started = time.time()
    src = load_source(source, options)
    if isinstance(src, FileSourceData) or src.train.noisy_labels is not None:
        if not spec.is_none:
            raise DataError(f"source '{source}' comes with real noisy labels; do not add synthetic noise ({noise})")
    if isinstance(src, FileSourceData):
        from metacorrect.datasets.prepare_files import prepare_files

        return prepare_files(src, out, clean_per_class=clean_per_class, val_per_class=val_per_class, seed=seed,
                             limit=limit, overwrite=overwrite, shard_bytes=shard_bytes, workers=workers,
                             progress=progress, prepare_args={"options": dict(options or {}), "limit": limit})
    if limit is not None:
        src.train = _head(src.train, limit)
        src.test = None if src.test is None else _head(src.test, limit)
    split_seed, noise_seed = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    idx = split_pool(src.train.labels, src.num_classes, clean_per_class, val_per_class,
                     None if src.test is not None else test_fraction, split_seed)

    noisy_idx = idx["noisy_train"]
    true_noisy = src.train.labels[noisy_idx]
    if src.train.noisy_labels is not None:
        if not spec.is_none:
            raise DataError(f"source '{source}' comes with real noisy labels; do not add synthetic noise ({noise})")
        given = src.train.noisy_labels[noisy_idx]
        known = true_noisy >= 0
        transition = empirical_transition(true_noisy[known], given[known], src.num_classes)
        empirical, rate, description = transition, (float(np.mean(given[known] != true_noisy[known]))
                                                    if known.any() else None), "real noisy labels of the source"
    else:
        features = (lambda j: src.train.pixels(noisy_idx[j])) if src.train.pixels else None
        result = apply_noise(spec, true_noisy, src.num_classes, noise_seed, features=features,
                             coarse_of_class=src.coarse_of_class)
        given, transition, empirical = result.noisy_labels, result.transition, result.empirical
        rate, description = result.actual_rate, result.description

    plans = {
        "noisy_train": SplitPlan(src.train, noisy_idx, given, true_noisy),
        "clean_train": SplitPlan(src.train, idx["clean_train"], *[src.train.labels[idx["clean_train"]]] * 2),
        "val": SplitPlan(src.train, idx["val"], *[src.train.labels[idx["val"]]] * 2),
    }
    if src.test is not None:
        all_test = np.arange(len(src.test))
        plans["test"] = SplitPlan(src.test, all_test, src.test.labels, src.test.labels)
    else:
        plans["test"] = SplitPlan(src.train, idx["test"], *[src.train.labels[idx["test"]]] * 2)

    mean, std = _pixel_stats(plans, src.encoding, src.image_shape)
    total = sum(len(p.indices) for p in plans.values())
    parallel = src.train.generated and total >= PARALLEL_FROM
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if parallel:
            work = _write_resumable(src, plans, tmp, out, shard_bytes, workers, progress,
                                    key=[noise, clean_per_class, val_per_class, test_fraction, seed, limit])
        else:
            _write_in_process(plans, tmp, shard_bytes, _progress(total, f"prepare {source}", progress))
        meta = DatasetMeta(
            name=out.name, source=source, num_classes=src.num_classes, class_names=list(src.class_names),
            image_shape=list(src.image_shape), encoding=src.encoding,
            counts={s: int(len(plans[s].indices)) for s in SPLITS},
            noise=spec.to_string(), noise_description=description, seed=seed,
            transition=np.asarray(transition).round(6).tolist(),
            empirical_transition=None if empirical is None else np.asarray(empirical).round(6).tolist(),
            actual_noise_rate=None if rate is None else round(float(rate), 6),
            pixel_mean=mean, pixel_std=std, source_checksum=src.checksum,
            prepare_args={"clean_per_class": clean_per_class, "val_per_class": val_per_class,
                          "test_fraction": test_fraction if src.test is None else None,
                          "options": dict(options or {}), **({"limit": limit} if limit else {})},
        )
        (tmp / "meta.json").write_text(meta.to_json())  # last: its presence marks a complete data set
    if parallel:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"prepared {out} in {time.time() - started:.1f}s: " +
              ", ".join(f"{s} {meta.counts[s]}" for s in SPLITS) +
              (f", actual noise {meta.actual_noise_rate:.3f}" if meta.actual_noise_rate is not None else ""))
    return meta


def _write_in_process(plans: dict[str, SplitPlan], tmp: Path, shard_bytes: int, bar) -> None:
    for split in SPLITS:
        plan = plans[split]
        with ShardWriter(tmp / split, max_bytes=shard_bytes) as writer:
            for lo in range(0, len(plan.indices), CHUNK):
                sl = slice(lo, lo + CHUNK)
                images = plan.pool.read(plan.indices[sl])
                writer.write(np.arange(lo, lo + len(images)), images, plan.labels[sl], plan.true_labels[sl])
                bar.update(len(images))
    bar.close()


@dataclass
class PoolImages:
    """The shard loader of a generated pool: indices -> encoded images (a generated image is never skipped)."""

    read: Callable[[np.ndarray], list[bytes]]

    def __call__(self, indices: list[int]) -> list[tuple[bytes, str]]:
        # In chunks: a shard's pixels (before encoding) would be ~10x its stored size.
        return [(blob, "") for lo in range(0, len(indices), CHUNK)
                for blob in self.read(np.asarray(indices[lo:lo + CHUNK], np.int64))]


def _write_resumable(src: SourceData, plans: dict[str, SplitPlan], tmp: Path, out: Path, shard_bytes: int,
                     workers: int | None, progress: bool, key: list) -> Path:
    """Write the splits through the resumable shard tasks; returns the work directory (removed once complete)."""
    row_bytes = max(1, len(src.train.read(np.zeros(1, np.int64))[0]))
    rows = max(CHUNK, shard_bytes // row_bytes)
    shard_plans = plan_shards({s: (p.indices.tolist(), p.labels, p.true_labels) for s, p in plans.items()}, rows)
    if any(p.pool is not src.train for p in plans.values()):
        raise DataError(f"{src.name}: a generated source with its own test pool cannot be prepared in parallel")
    work = work_dir_of(out)
    todo = open_work_dir(work, hashlib.sha256(json.dumps([src.checksum, rows, *key]).encode()).hexdigest()[:16],
                         shard_plans, progress)
    run_shards(PoolImages(src.train.read), shard_plans, todo, work, workers, progress, f"prepare {src.name}")
    finalize(shard_plans, work, tmp)
    return work


def _head(pool: Pool, n: int) -> Pool:
    """The first `n` images of a pool (indices keep their meaning, so `read` works unchanged)."""
    if n >= len(pool):
        return pool
    return Pool(labels=pool.labels[:n], read=pool.read, pixels=pool.pixels,
                noisy_labels=None if pool.noisy_labels is None else pool.noisy_labels[:n])


def _pixel_stats(plans: dict[str, SplitPlan], encoding: str,
                 shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over a sample of the training images (labels are not used)."""
    pixels = []
    for split in ("noisy_train", "clean_train"):
        plan = plans[split]
        # The first rows of the (randomly drawn) split: contiguous, so lazy sources read few blocks.
        chosen = plan.indices[:STATS_SAMPLE // 2]
        if len(chosen):
            pixels.append(decode_images(plan.pool.read(chosen), encoding, shape))
    px = np.concatenate(pixels).astype(np.float64) / 255.0
    return (px.mean(axis=(0, 1, 2)).round(6).tolist(), np.maximum(px.std(axis=(0, 1, 2)), 1e-3).round(6).tolist())


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)
