"""Preparing image-folder sources (Clothing1M, Food-101N) on Ray Data, resumable shard by shard.

Each split's file list is cut into shards (resumable.py: one Ray Data task per shard, resumable after a
kill). A task reads its files, decodes (JPEG draft mode: the DCT decodes at the smallest scale >= the
target), resizes the short side to `image_size`, centre-crops a square and re-encodes JPEG. Missing and
undecodable images are skipped, counted and listed, never silently dropped. When all shards are done they
are linked into a temporary directory, meta.json is written, and the directory is renamed to DIR in one step.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from metacorrect.datasets.codec import decode_images
from metacorrect.datasets.contract import SPLITS, DataError, DatasetMeta
from metacorrect.datasets.noise import empirical_transition
from metacorrect.datasets.resumable import (SKIPPED_FILE, finalize, open_work_dir, plan_shards, run_shards,
                                            work_dir_of)
from metacorrect.datasets.shards import DEFAULT_SHARD_BYTES, atomic_directory
from metacorrect.datasets.sources.base import FileList, FileSourceData

STATS_SAMPLE = 1024


@dataclass
class FolderImages:
    """The shard loader of an image folder: relative paths -> stored squares (or why each was skipped)."""

    root: str
    size: int
    quality: int

    def __call__(self, paths: list[str]) -> list[tuple[bytes, str]]:
        return [load_square_jpeg(Path(self.root) / path, self.size, self.quality) for path in paths]


def prepare_files(src: FileSourceData, out: Path, *, clean_per_class: int, val_per_class: int, seed: int,
                  limit: int | None, overwrite: bool, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  workers: int | None = None, progress: bool = True,
                  prepare_args: dict[str, Any] | None = None) -> DatasetMeta:
    started = time.time()
    splits = {name: files.head(limit) for name, files in src.make_splits(clean_per_class, val_per_class, seed).items()}
    # ~1:8 JPEG compression of the stored squares; shards of ~shard_bytes.
    rows = max(16, shard_bytes // max(1, src.image_size * src.image_size * 3 // 8))
    plans = plan_shards({name: (f.paths, f.labels, f.true_labels) for name, f in splits.items()}, rows)
    key = hashlib.sha256(json.dumps([src.checksum, src.image_size, src.quality, rows, seed, clean_per_class,
                                     val_per_class, limit]).encode()).hexdigest()[:16]
    work = work_dir_of(out)
    todo = open_work_dir(work, key, plans, progress)
    run_shards(FolderImages(str(src.root), src.image_size, src.quality), plans, todo, work, workers, progress,
               f"prepare {src.name}")

    with atomic_directory(out, overwrite=overwrite) as tmp:
        counts, skipped = finalize(plans, work, tmp)
        meta = _meta(src, out, tmp, counts, skipped, splits, seed,
                     {"clean_per_class": clean_per_class, "val_per_class": val_per_class, "test_fraction": None,
                      "protocol": src.protocol, **(prepare_args or {})})
        (tmp / "meta.json").write_text(meta.to_json())
    shutil.rmtree(work, ignore_errors=True)
    if progress:
        total_skipped = sum(len(v) for v in skipped.values())
        print(f"prepared {out} in {time.time() - started:.1f}s: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS) +
              (f"; skipped {total_skipped} images ({', '.join(f'{len(v)} {k}' for k, v in skipped.items() if v)}; "
               f"listed in {out / SKIPPED_FILE})" if total_skipped else ""))
    return meta


def load_square_jpeg(path: Path, size: int, quality: int) -> tuple[bytes, str]:
    """(JPEG bytes of the short-side-resized, centre-cropped square, "") or (b"", why it was skipped)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return b"", "missing"
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")  # decodes fully: a truncated file fails here
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        return b"", f"corrupt: {type(e).__name__}: {e}"
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), ""


def _meta(src: FileSourceData, out: Path, tmp: Path, counts: dict[str, int], skipped: dict[str, list],
          splits: dict[str, FileList], seed: int, prepare_args: dict[str, Any]) -> DatasetMeta:
    for split in ("noisy_train", "clean_train"):
        if counts[split] == 0:
            raise DataError(f"{src.root}: no readable images in {split} ({len(splits[split])} listed, "
                            f"{sum(1 for k in skipped.values() for s, _, _ in k if s == split)} skipped)")
    from metacorrect.datasets.shards import read_split_table

    labels = read_split_table(tmp, "noisy_train", columns=["label", "true_label"])
    given = labels["label"].to_numpy().astype(np.int64)
    true = labels["true_label"].to_numpy().astype(np.int64)
    known = true >= 0
    transition = empirical_transition(true[known], given[known], src.num_classes)
    rate = float(np.mean(given[known] != true[known])) if known.any() and src.true_labels_unbiased else None
    description = src.noise_description + (f"; measured on {int(known.sum())} images with a true label"
                                           if known.any() else "")
    mean, std = _pixel_stats(tmp, src.image_size)
    return DatasetMeta(
        name=out.name, source=src.name, num_classes=src.num_classes, class_names=list(src.class_names),
        image_shape=[src.image_size, src.image_size, 3], encoding="jpeg", counts=counts, noise="none",
        noise_description=description, seed=seed, transition=transition.round(6).tolist(),
        empirical_transition=transition.round(6).tolist() if known.any() else None,
        actual_noise_rate=None if rate is None else round(rate, 6), pixel_mean=mean, pixel_std=std,
        source_checksum=src.checksum, prepare_args=prepare_args,
        skipped={kind: len(items) for kind, items in skipped.items()})


def _pixel_stats(tmp: Path, size: int) -> tuple[list[float], list[float]]:
    pixels = []
    for split in ("noisy_train", "clean_train"):
        files = sorted((tmp / split).glob("part-*.parquet"))
        if files:
            blobs = pq.read_table(files[0], columns=["image"])["image"].to_pylist()[:STATS_SAMPLE // 2]
            pixels.append(decode_images(blobs, "jpeg", (size, size, 3)))
    px = np.concatenate(pixels).astype(np.float64) / 255.0
    return px.mean(axis=(0, 1, 2)).round(6).tolist(), np.maximum(px.std(axis=(0, 1, 2)), 1e-3).round(6).tolist()
