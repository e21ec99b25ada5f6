"""Per-class, seeded splits of a source pool into test / val / clean (meta) / noisy, disjoint by construction.

The official MLC and EMLC loaders draw the clean and noisy sets with different RNG states, so ~98% of
the "clean" images also sit in the noisy set with corrupted labels.
Here one permutation per class is cut into consecutive, non-overlapping pieces.
"""
from __future__ import annotations

import numpy as np

from metacorrect.datasets.contract import DataError


def split_pool(labels: np.ndarray, num_classes: int, clean_per_class: int, val_per_class: int,
               test_fraction: float | None, seed: int) -> dict[str, np.ndarray]:
    """Indices (sorted) into `labels` for each split; `test_fraction=None` draws no test split."""
    rng = np.random.default_rng(seed)
    pieces: dict[str, list[np.ndarray]] = {"test": [], "val": [], "clean_train": [], "noisy_train": []}
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx))) if test_fraction else 0
        need = n_test + val_per_class + clean_per_class
        if need > len(idx):
            raise DataError(f"class {c} has {len(idx)} images, fewer than the {need} needed for "
                            f"test ({n_test}) + val ({val_per_class}) + clean ({clean_per_class})")
        cuts = np.cumsum([n_test, val_per_class, clean_per_class])
        for name, part in zip(pieces, np.split(idx, cuts)):
            pieces[name].append(part)
    out = {name: np.sort(np.concatenate(parts)) for name, parts in pieces.items()}
    if test_fraction is None:
        out.pop("test")
    return out
