"""Writing parquet shards of bounded size, and directories that appear only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metacorrect.datasets.contract import SCHEMA, DataError

DEFAULT_SHARD_BYTES = 64 * 2**20


class ShardWriter:
    """Appends rows to DIR/part-00000.parquet, ..., starting a new file past `max_bytes` of image data."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.rows = 0
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._bytes_in_file = 0

    def write(self, ids: np.ndarray, images: list[bytes], labels: np.ndarray, true_labels: np.ndarray) -> None:
        if not len(ids):
            return
        if self._writer is None or self._bytes_in_file >= self.max_bytes:
            self._roll()
        table = pa.Table.from_arrays(
            [pa.array(np.asarray(ids, np.int64)), pa.array(images, pa.binary()),
             pa.array(np.asarray(labels, np.int16)), pa.array(np.asarray(true_labels, np.int16))],
            schema=SCHEMA)
        self._writer.write_table(table)
        self._bytes_in_file += sum(len(b) for b in images)
        self.rows += len(ids)

    def _roll(self) -> None:
        self.close()
        path = self.directory / f"part-{len(self.files):05d}.parquet"
        # Images are already compressed (or tiny); dictionary-encode only the label columns.
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="snappy",
                                        use_dictionary=["label", "true_label"])
        self.files.append(path)
        self._bytes_in_file = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only if the block succeeds.

    An interrupted or failed prepare leaves at most a `.tmp-*` directory, never a `final` that looks complete.
    """
    final = Path(final).resolve()
    if final.exists() and not overwrite:
        raise DataError(f"{final}: already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed prepare
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def read_split_table(directory: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """Whole split as one Arrow table (small splits and tests; training streams through Ray Data)."""
    from metacorrect.datasets.contract import split_files

    files = split_files(directory, split)
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
