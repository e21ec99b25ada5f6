"""What a split's label columns tell without its images: which noisy rows have a known true label (to measure
label recovery at any scale), and a digest of the noisy labels (the noise realisation a run trained on).

On Clothing1M only a few percent of the noisy images have a verified label, and on any large set a pass over
every noisy row each epoch costs a good share of an epoch of training. The measured rows are a fixed, seeded
subset of the known ones (read from the label columns alone, not the images), the same every epoch and on
every resume.
"""
from __future__ import annotations

from pathlib import Path

import hashlib

import numpy as np
import pyarrow.parquet as pq

from metacorrect.datasets.contract import split_files


def known_subset(directory: str | Path, split: str, cap: int, seed: int) -> tuple[np.ndarray, int, int]:
    """(sorted ids of at most `cap` rows of `split` with a known true label, chosen by `seed`; how many rows
    have one; how many rows there are)."""
    ids, total = [], 0
    for file in split_files(directory, split):
        table = pq.read_table(file, columns=["id", "true_label"])
        total += table.num_rows
        known = table["true_label"].to_numpy() >= 0
        ids.append(table["id"].to_numpy()[known])
    known_ids = np.sort(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
    chosen = known_ids
    if len(known_ids) > cap:
        chosen = np.sort(np.random.default_rng(seed).choice(known_ids, cap, replace=False))
    return chosen.astype(np.int64), len(known_ids), total


def label_digest(directory: str | Path, split: str = "noisy_train") -> str:
    """16 hex digits of the SHA-256 of (id, label) of every row of `split`, in id order: two data sets with the
    same digest train on the same noisy labels."""
    ids, labels = [], []
    for file in split_files(directory, split):
        table = pq.read_table(file, columns=["id", "label"])
        ids.append(table["id"].to_numpy())
        labels.append(table["label"].to_numpy())
    if not ids:
        return hashlib.sha256(b"").hexdigest()[:16]
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    pairs = np.stack([all_ids[order], np.concatenate(labels)[order]]).astype(np.int64)
    return hashlib.sha256(pairs.tobytes()).hexdigest()[:16]
