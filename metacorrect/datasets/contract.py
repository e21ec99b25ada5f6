"""The on-disk data contract every part of metacorrect reads (docs/data.md, "The data contract").

DIR/meta.json + DIR/{noisy_train,clean_train,val,test}/part-*.parquet with columns
id int64 (dense 0..N-1 per split), image binary, label int16 (what a method may see),
true_label int16 (-1 when unknown; metrics only). meta.json is written last, so a directory
without it is not a data set.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from metacorrect.errors import DataError  # noqa: F401  (part of the data contract's API)

FORMAT_VERSION = 1
SPLITS = ("noisy_train", "clean_train", "val", "test")
SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("image", pa.binary()),
    ("label", pa.int16()),
    ("true_label", pa.int16()),
])


@dataclass
class DatasetMeta:
    name: str
    source: str
    num_classes: int
    class_names: list[str]
    image_shape: list[int]  # [H, W, C]
    encoding: str  # raw | png | jpeg
    counts: dict[str, int]
    noise: str  # canonical noise spec, "none" for clean sources and real noise
    noise_description: str
    seed: int
    transition: list[list[float]]  # the noise model's T (true x noisy); empirical where no model exists
    empirical_transition: list[list[float]] | None  # measured on noisy_train where true labels are known
    actual_noise_rate: float | None  # None when true labels of noisy_train are unknown
    pixel_mean: list[float]  # per channel, in [0, 1], measured on the training splits
    pixel_std: list[float]
    source_checksum: str
    prepare_args: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # images left out by prepare, by reason (missing, corrupt)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_meta(directory: str | Path) -> DatasetMeta:
    directory = Path(directory)
    path = directory / "meta.json"
    if not directory.is_dir():
        raise DataError(f"{directory}: data set directory not found (make one with `metacorrect data prepare`)")
    if not path.is_file():
        raise DataError(f"{path}: missing; {directory} is not a complete prepared data set")
    try:
        raw = json.loads(path.read_text())
        meta = DatasetMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{path}: not a metacorrect meta.json ({e})") from None
    if meta.format_version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {meta.format_version}, this metacorrect reads {FORMAT_VERSION}")
    for split in SPLITS:
        if meta.counts.get(split, 0) and not split_files(directory, split):
            raise DataError(f"{directory / split}: no parquet shards, but meta.json counts {meta.counts[split]} rows")
    return meta


def split_files(directory: str | Path, split: str) -> list[str]:
    return sorted(str(p) for p in (Path(directory) / split).glob("part-*.parquet"))
