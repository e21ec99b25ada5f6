"""`metacorrect data inspect`: what a prepared data set holds, checked against its shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from metacorrect.datasets.contract import SPLITS, read_meta, split_files
from metacorrect.datasets.noise import empirical_transition
from metacorrect.datasets.validate import check_dataset


def inspect_dataset(directory: str | Path) -> str:
    directory = Path(directory)
    meta = read_meta(directory)
    check_dataset(directory, meta)  # a damaged shard is one line naming it, not a pyarrow traceback
    lines = [f"data set   {directory.resolve()}",
             f"source     {meta.source} ({meta.num_classes} classes, images {'x'.join(map(str, meta.image_shape))}"
             f" {meta.encoding}, checksum {meta.source_checksum})",
             f"noise      {meta.noise}: {meta.noise_description} (seed {meta.seed})",
             "", f"{'split':<12}{'rows':>8}{'shards':>8}{'MiB':>9}  label noise (label != true_label)"]
    noisy_true = noisy_given = None
    for split in SPLITS:
        files = split_files(directory, split)
        rows = meta.counts[split]
        size = sum(Path(f).stat().st_size for f in files) / 2**20
        labels = pq.read_table(files, columns=["label", "true_label"]) if files else None
        note = "-"
        if labels is not None and rows:
            given = labels["label"].to_numpy().astype(np.int64)
            true = labels["true_label"].to_numpy().astype(np.int64)
            known = true >= 0
            note = f"{np.mean(given[known] != true[known]):.3f}" if known.any() else "true labels unknown"
            if split == "noisy_train" and known.any():
                noisy_true, noisy_given = true[known], given[known]
        lines.append(f"{split:<12}{rows:>8}{len(files):>8}{size:>9.2f}  {note}")
    lines += ["", "noise transition matrix T[true, noisy] of the noise model:", _matrix(np.array(meta.transition))]
    if noisy_true is not None:
        lines += ["", "measured on noisy_train:",
                  _matrix(empirical_transition(noisy_true, noisy_given, meta.num_classes))]
    return "\n".join(lines)


def _matrix(m: np.ndarray) -> str:
    width = max(4, len(str(m.shape[0] - 1)) + 1)
    head = " " * 6 + "".join(f"{j:>{width + 2}}" for j in range(m.shape[1]))
    rows = [f"{i:>5} " + "".join(f"{v:>{width + 2}.2f}" for v in row) for i, row in enumerate(m)]
    return "\n".join([head, *rows])
