"""Preparing a data set shard by shard on Ray Data, resumable after a kill (image folders, generated sources).

Each split's items (image paths, or indices into a generated pool) are cut into shards of a fixed number
of items. Every shard is one Ray Data task: `load` the items to encoded images, write one work parquet
file and a report of the items it skipped. Skipped items are counted and listed, never silently dropped.

Work files live in DIR's sibling `.work-NAME/` and survive a killed prepare: a rerun with the same
arguments (the `key`) redoes only the shards without a finished work file. `finalize` links the shards
into the caller's temporary directory with dense ids (rewritten only after a shard that skipped items).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metacorrect.datasets.contract import SCHEMA, SPLITS

SKIPPED_FILE = "skipped.tsv"

# items of one shard -> (encoded image, "") or (b"", why it was skipped), one per item, in order.
Loader = Callable[[list], list[tuple[bytes, str]]]


@dataclass
class ShardPlan:
    split: str
    index: int
    start: int  # planned id of the shard's first row (exact when no earlier shard skipped items)
    items: list  # what `Loader` takes: relative image paths, pool indices
    labels: np.ndarray
    true_labels: np.ndarray


def work_dir_of(out: Path) -> Path:
    return out.parent / f".work-{out.name}"


def plan_shards(splits: dict[str, tuple[Sequence, np.ndarray, np.ndarray]], rows: int) -> list[ShardPlan]:
    """splits: name -> (items, labels, true_labels); shards of `rows` items, in SPLITS order."""
    plans = []
    for split in SPLITS:
        items, labels, true_labels = splits[split]
        for index, lo in enumerate(range(0, len(items), rows)):
            hi = min(len(items), lo + rows)
            plans.append(ShardPlan(split, index, lo, list(items[lo:hi]), labels[lo:hi], true_labels[lo:hi]))
    return plans


def open_work_dir(work: Path, key: str, plans: list[ShardPlan], progress: bool) -> list[ShardPlan]:
    """Create (or reuse, if left by a prepare with the same `key`) the work directory; the shards still to do."""
    stamp = work / "plan.json"
    if work.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        if progress:
            print(f"{work}: left by a prepare with other arguments; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        stamp.write_text(json.dumps({"key": key}))
    todo = [p for p in plans if not _done(work, p)]
    if progress and len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already prepared in {work}")
    return todo


def _shard_paths(work: Path, split: str, index: int) -> tuple[Path, Path]:
    return work / split / f"part-{index:05d}.parquet", work / split / f"part-{index:05d}.json"


def _done(work: Path, plan: ShardPlan) -> bool:
    data, report = _shard_paths(work, plan.split, plan.index)
    return data.is_file() and report.is_file()


def run_shards(load: Loader, plans: list[ShardPlan], todo: list[ShardPlan], work: Path, workers: int | None,
               progress: bool, desc: str) -> None:
    """Write the work files of `todo`, one Ray Data task per shard, at most `workers` at a time."""
    import ray.data
    from tqdm import tqdm

    from metacorrect.platform.cluster import ensure_ray

    if not todo:
        return
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, not blocks
    specs = [{"split": p.split, "index": p.index, "start": p.start, "items": p.items,
              "labels": p.labels.tolist(), "true_labels": p.true_labels.tolist()} for p in todo]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds = ds.map_batches(process_shards, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.TaskPoolStrategy(size=workers),
                        fn_kwargs={"load": load, "work": str(work)})
    done = sum(len(p.items) for p in plans if p not in todo)
    bar = tqdm(total=sum(len(p.items) for p in plans), initial=done, desc=desc, unit="img", disable=not progress,
               leave=False)
    for row in ds.iter_rows():
        bar.update(int(row["rows"]))
    bar.close()


def process_shards(batch: pa.Table, load: Loader, work: str) -> dict[str, np.ndarray]:
    """Ray Data task: turn each shard spec of the batch into a finished work file."""
    done = []
    for spec in batch.to_pylist():
        images, labels, true_labels, skipped = [], [], [], []
        loaded = load(spec["items"])
        for item, (blob, problem), label, true in zip(spec["items"], loaded, spec["labels"], spec["true_labels"]):
            if problem:
                skipped.append([str(item), problem])
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
        done.append(len(spec["items"]))
    return {"rows": np.asarray(done, np.int64)}


def _write_atomic(path: Path, data: bytes) -> None:
    part = path.with_suffix(f".tmp{os.getpid()}")
    part.write_bytes(data)
    os.replace(part, path)


def finalize(plans: list[ShardPlan], work: Path, tmp: Path) -> tuple[dict[str, int], dict[str, list]]:
    """Link (or, after a skip, rewrite with shifted ids) the work files into `tmp`; counts and skipped items."""
    counts = {s: 0 for s in SPLITS}
    skipped: dict[str, list] = {"missing": [], "corrupt": []}
    written = {s: 0 for s in SPLITS}
    for plan in plans:
        data, report = _shard_paths(work, plan.split, plan.index)
        info = json.loads(report.read_text())
        for item, why in info["skipped"]:
            skipped["missing" if why == "missing" else "corrupt"].append((plan.split, item, why))
        kept = int(info["kept"])
        target_dir = tmp / plan.split
        target_dir.mkdir(exist_ok=True)
        if kept:
            target = target_dir / f"part-{written[plan.split]:05d}.parquet"
            if counts[plan.split] == plan.start:
                _link_or_copy(data, target)
            else:  # an earlier shard skipped items: shift the ids so they stay dense
                table = pq.read_table(data)
                ids = pa.array(np.arange(counts[plan.split], counts[plan.split] + kept, dtype=np.int64))
                pq.write_table(table.set_column(0, "id", ids), target, compression="snappy",
                               use_dictionary=["label", "true_label"])
            written[plan.split] += 1
        counts[plan.split] += kept
    for split in SPLITS:
        (tmp / split).mkdir(exist_ok=True)
    rows = [f"{split}\t{item}\t{why}" for kind in skipped.values() for split, item, why in kind]
    if rows:
        (tmp / SKIPPED_FILE).write_text("split\tpath\treason\n" + "\n".join(rows) + "\n")
    return counts, skipped


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
