"""The check a prepared data set passes before anything trains on it: cheap at any scale.

Only parquet footers and the three integer columns are read (never the images), so a 1M-image data set is
checked in seconds: every shard readable and with the contract's columns, row counts as meta.json says, ids
of each split exactly 0..n-1, labels in [0, C), true labels in [-1, C). Each problem is one line naming the
file (and the row within it where there is one); `DataError` carries them all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metacorrect.datasets.contract import SCHEMA, SPLITS, DataError, DatasetMeta, split_files
from metacorrect.errors import first_line

MAX_PROBLEMS = 10  # a badly damaged data set is described by its first problems, not thousands of lines
INT_COLUMNS = ["id", "label", "true_label"]


def check_dataset(directory: str | Path, meta: DatasetMeta) -> None:
    """Raise `DataError` (one line per problem) unless every split of `directory` holds what meta.json says."""
    directory = Path(directory)
    problems: list[str] = []
    for split in SPLITS:
        problems += _check_split(directory, split, meta)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and more; run `metacorrect data inspect {directory}` after fixing these")
        raise DataError("\n".join(shown))


def _check_split(directory: Path, split: str, meta: DatasetMeta) -> list[str]:
    expected = int(meta.counts.get(split, 0))
    classes = int(meta.num_classes)
    seen = np.zeros(expected, dtype=np.int32)  # how often each id occurs
    problems: list[str] = []
    rows, unreadable = 0, False
    for path in split_files(directory, split):
        try:
            shard = pq.ParquetFile(path)
            missing = [c for c in SCHEMA.names if c not in shard.schema_arrow.names]
            if missing:
                problems.append(f"{path}: no column {', '.join(missing)} (expected {', '.join(SCHEMA.names)})")
                unreadable = True
                continue
            table = shard.read(columns=INT_COLUMNS)
        except (pa.ArrowException, OSError) as e:
            problems.append(f"{path}: not a readable parquet shard ({first_line(e)})")
            unreadable = True
            continue
        rows += table.num_rows
        ids, label, true = (table[c].to_numpy(zero_copy_only=False).astype(np.int64) for c in INT_COLUMNS)
        problems += _out_of_range(path, "label", label, ids, 0, classes)
        problems += _out_of_range(path, "true_label", true, ids, -1, classes)
        outside = np.flatnonzero((ids < 0) | (ids >= expected))
        if outside.size:
            r = int(outside[0])
            problems.append(f"{path}: row {r}: id {ids[r]} outside [0, {expected}) of split {split}"
                            + _more(outside.size))
        inside = ids[(ids >= 0) & (ids < expected)]
        np.add.at(seen, inside, 1)
    if unreadable:  # its rows are unknown: counts and ids cannot be checked
        return problems
    if rows != expected:
        problems.append(f"{directory / split}: shards hold {rows} rows, meta.json says {expected}")
    elif expected:
        repeated = np.flatnonzero(seen > 1)
        if repeated.size:
            problems.append(f"{directory / split}: id {int(repeated[0])} occurs {int(seen[repeated[0]])} times "
                            f"(ids must be 0..{expected - 1}, each once)" + _more(repeated.size, "ids"))
    return problems


def _out_of_range(path: str, column: str, values: np.ndarray, ids: np.ndarray, low: int, high: int) -> list[str]:
    bad = np.flatnonzero((values < low) | (values >= high))
    if not bad.size:
        return []
    r = int(bad[0])
    return [f"{path}: row {r} (id {ids[r]}): {column} {values[r]} outside [{low}, {high})" + _more(bad.size)]


def _more(count: int, what: str = "rows") -> str:
    return f"; {count} such {what} in all" if count > 1 else ""
