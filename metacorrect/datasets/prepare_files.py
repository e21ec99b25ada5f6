"""Preparing image-folder sources (Clothing1M, Food-101N) on Ray Data, resumable shard by shard.

Each split's file list is cut into shards of a fixed number of list entries. Every shard is one Ray Data
task: read the files, decode (JPEG draft mode: the DCT decodes at the smallest scale >= the target), resize
the short side to `image_size`, centre-crop a square, re-encode JPEG, write one work parquet file.
Missing and undecodable images are skipped, counted and listed, never silently dropped.

Work files live in DIR's sibling `.work-NAME/` and survive a killed prepare: a rerun with the same
source and arguments redoes only the shards without a finished work file. When all are done, the shards
are linked into a temporary directory with dense ids (rewritten only after a shard that skipped
images), meta.json is written, and the directory is renamed to DIR in one step.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metacorrect.datasets.codec import decode_images
from metacorrect.datasets.contract import SCHEMA, SPLITS, DataError, DatasetMeta
from metacorrect.datasets.noise import empirical_transition
from metacorrect.datasets.shards import DEFAULT_SHARD_BYTES, atomic_directory
from metacorrect.datasets.sources.base import FileList, FileSourceData

STATS_SAMPLE = 1024
SKIPPED_FILE = "skipped.tsv"


@dataclass
class ShardPlan:
    split: str
    index: int
    start: int  # planned id of the shard's first row (exact when no earlier shard skipped images)
    files: FileList


def work_dir_of(out: Path) -> Path:
    return out.parent / f".work-{out.name}"


def prepare_files(src: FileSourceData, out: Path, *, clean_per_class: int, val_per_class: int, seed: int,
                  limit: int | None, overwrite: bool, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  workers: int | None = None, progress: bool = True,
                  prepare_args: dict[str, Any] | None = None) -> DatasetMeta:
    started = time.time()
    splits = {name: files.head(limit) for name, files in src.make_splits(clean_per_class, val_per_class, seed).items()}
    # ~1:8 JPEG compression of the stored squares; shards of ~shard_bytes.
    rows = max(16, shard_bytes // max(1, src.image_size * src.image_size * 3 // 8))
    plans = _plan(splits, rows)
    key = hashlib.sha256(json.dumps([src.checksum, src.image_size, src.quality, rows, seed, clean_per_class,
                                     val_per_class, limit]).encode()).hexdigest()[:16]
    work = work_dir_of(out)
    _open_work_dir(work, key, progress)
    todo = [p for p in plans if not _done(work, p)]
    if progress and len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already prepared in {work}")
    if todo:
        _run_on_ray(src, todo, work, workers, progress, sum(len(p.files) for p in plans),
                    sum(len(p.files) for p in plans if p not in todo))

    with atomic_directory(out, overwrite=overwrite) as tmp:
        counts, skipped = _finalize(plans, work, tmp)
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


def _plan(splits: dict[str, FileList], rows: int) -> list[ShardPlan]:
    plans = []
    for split in SPLITS:
        files = splits[split]
        for index, lo in enumerate(range(0, len(files), rows)):
            hi = min(len(files), lo + rows)
            plans.append(ShardPlan(split, index, lo, FileList(files.paths[lo:hi], files.labels[lo:hi],
                                                              files.true_labels[lo:hi])))
    return plans


def _open_work_dir(work: Path, key: str, progress: bool) -> None:
    stamp = work / "plan.json"
    if work.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        if progress:
            print(f"{work}: left by a prepare with other arguments; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        stamp.write_text(json.dumps({"key": key}))


def _shard_paths(work: Path, split: str, index: int) -> tuple[Path, Path]:
    return work / split / f"part-{index:05d}.parquet", work / split / f"part-{index:05d}.json"


def _done(work: Path, plan: ShardPlan) -> bool:
    data, report = _shard_paths(work, plan.split, plan.index)
    return data.is_file() and report.is_file()


def _run_on_ray(src: FileSourceData, todo: list[ShardPlan], work: Path, workers: int | None, progress: bool,
                total: int, already: int) -> None:
    import ray.data
    from tqdm import tqdm

    from metacorrect.platform.cluster import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
    items = [{"split": p.split, "index": p.index, "start": p.start, "paths": p.files.paths,
              "labels": p.files.labels.tolist(), "true_labels": p.files.true_labels.tolist()} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(process_shards, batch_size=1, batch_format="pyarrow", concurrency=workers,
                        fn_kwargs={"root": str(src.root), "work": str(work), "size": src.image_size,
                                   "quality": src.quality})
    bar = tqdm(total=total, initial=already, desc=f"prepare {src.name}", unit="img", disable=not progress,
               leave=False)
    for row in ds.iter_rows():
        bar.update(int(row["rows"]))
    bar.close()


def process_shards(batch: pa.Table, root: str, work: str, size: int, quality: int) -> dict[str, np.ndarray]:
    """Ray Data task: turn each shard spec of the batch into a finished work file."""
    done = []
    for spec in batch.to_pylist():
        images, labels, true_labels, skipped = [], [], [], []
        for path, label, true in zip(spec["paths"], spec["labels"], spec["true_labels"]):
            blob, problem = load_square_jpeg(Path(root) / path, size, quality)
            if problem:
                skipped.append([path, problem])
                continue
            images.append(blob)
            labels.append(label)
            true_labels.append(true)
        table = pa.Table.from_arrays(
            [pa.array(np.arange(spec["start"], spec["start"] + len(images), dtype=np.int64)),
             pa.array(images, pa.binary()), pa.array(np.asarray(labels, np.int16)),
             pa.array(np.asarray(true_labels, np.int16))], schema=SCHEMA)
        data, report = _shard_paths(Path(work), spec["split"], spec["index"])
        data.parent.mkdir(parents=True, exist_ok=True)
        # The report first, the data file last: a data file (with its report) marks a finished shard.
        _write_atomic(report, json.dumps({"kept": len(images), "skipped": skipped}).encode())
        part = data.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, part, compression="snappy", use_dictionary=["label", "true_label"])
        os.replace(part, data)
        done.append(len(spec["paths"]))
    return {"rows": np.asarray(done, np.int64)}


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


def _write_atomic(path: Path, data: bytes) -> None:
    part = path.with_suffix(f".tmp{os.getpid()}")
    part.write_bytes(data)
    os.replace(part, path)


def _finalize(plans: list[ShardPlan], work: Path, tmp: Path) -> tuple[dict[str, int], dict[str, list]]:
    """Link (or, after a skip, rewrite with shifted ids) the work files into `tmp`; counts and skipped items."""
    counts = {s: 0 for s in SPLITS}
    skipped: dict[str, list] = {"missing": [], "corrupt": []}
    written = {s: 0 for s in SPLITS}
    for plan in plans:
        data, report = _shard_paths(work, plan.split, plan.index)
        info = json.loads(report.read_text())
        for path, why in info["skipped"]:
            skipped["missing" if why == "missing" else "corrupt"].append((plan.split, path, why))
        kept = int(info["kept"])
        target_dir = tmp / plan.split
        target_dir.mkdir(exist_ok=True)
        if kept:
            target = target_dir / f"part-{written[plan.split]:05d}.parquet"
            if counts[plan.split] == plan.start:
                _link_or_copy(data, target)
            else:  # an earlier shard skipped images: shift the ids so they stay dense
                table = pq.read_table(data)
                ids = pa.array(np.arange(counts[plan.split], counts[plan.split] + kept, dtype=np.int64))
                pq.write_table(table.set_column(0, "id", ids), target, compression="snappy",
                               use_dictionary=["label", "true_label"])
            written[plan.split] += 1
        counts[plan.split] += kept
    for split in SPLITS:
        (tmp / split).mkdir(exist_ok=True)
    rows = [f"{split}\t{path}\t{why}" for kind in skipped.values() for split, path, why in kind]
    if rows:
        (tmp / SKIPPED_FILE).write_text("split\tpath\treason\n" + "\n".join(rows) + "\n")
    return counts, skipped


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
