"""CIFAR-10 / CIFAR-100 from the standard python-pickle folders, and CIFAR-10N's human labels over CIFAR-10.

Layouts (as published, what `tar xzf cifar-10-python.tar.gz` gives):
  cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
      each batch: {b"data": uint8 (10000, 3072) channel-major, b"labels": [int], ...}; meta: {b"label_names": [...]}
  cifar-100-python/     train, test, meta
      train/test: {b"data", b"fine_labels", b"coarse_labels", ...}; meta: {b"fine_label_names", b"coarse_label_names"}
  CIFAR-10N (cifar-10-100n repo, data/CIFAR-10_human.pt): a dict of (50000,) label arrays in CIFAR-10 training
      order: clean_label, aggre_label, random_label1..3, worse_label. `.npy` (the same dict pickled by numpy) also works.

Images are 32x32x3 and stored raw (decode is a reshape). The noise models and clean splits of `prepare`
apply on top; CIFAR-10N brings its own noisy labels instead.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from metacorrect.datasets.codec import encode_image
from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import Pool, SourceData

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10N_SETS = {"aggregate": "aggre_label", "random1": "random_label1", "random2": "random_label2",
                 "random3": "random_label3", "worst": "worse_label"}


def load_cifar10_source(root: str) -> SourceData:
    folder = _folder(root, "cifar10", "cifar-10-batches-py", "data_batch_1")
    names = _names(folder / "batches.meta", b"label_names", 10)
    train = [_batch(folder / f, b"labels", 10) for f in CIFAR10_TRAIN]
    test = _batch(folder / "test_batch", b"labels", 10)
    pixels = np.concatenate([p for p, _ in train])
    labels = np.concatenate([y for _, y in train])
    return _source("cifar10", names, pixels, labels, *test)


def load_cifar100_source(root: str) -> SourceData:
    folder = _folder(root, "cifar100", "cifar-100-python", "train")
    names = _names(folder / "meta", b"fine_label_names", 100)
    pixels, labels, coarse = _batch(folder / "train", b"fine_labels", 100, coarse_key=b"coarse_labels")
    test_pixels, test_labels, _ = _batch(folder / "test", b"fine_labels", 100, coarse_key=b"coarse_labels")
    # Superclass of each fine class, read off the training labels (the pair-noise map of CIFAR-100).
    coarse_of_class = np.full(100, -1, np.int64)
    coarse_of_class[labels] = coarse
    if (coarse_of_class < 0).any() or (coarse_of_class[labels] != coarse).any():
        raise DataError(f"{folder / 'train'}: coarse_labels do not give one superclass per fine class")
    src = _source("cifar100", names, pixels, labels, test_pixels, test_labels)
    src.coarse_of_class = coarse_of_class
    return src


def load_cifar10n_source(root: str, labels: str, label_set: str = "worst") -> SourceData:
    """CIFAR-10 images with one of CIFAR-10N's human label sets as the noisy labels of the training pool."""
    if label_set not in CIFAR10N_SETS:
        raise DataError(f"cifar10n: label_set '{label_set}' (expected one of {', '.join(CIFAR10N_SETS)})")
    src = load_cifar10_source(root)
    table = _load_label_file(Path(labels).expanduser())
    key = CIFAR10N_SETS[label_set]
    for needed in ("clean_label", key):
        if needed not in table:
            raise DataError(f"{labels}: no '{needed}' entry (expected the keys {', '.join(sorted(table))} to "
                            f"include clean_label and {', '.join(CIFAR10N_SETS.values())})")
    clean = _label_array(table["clean_label"], labels, "clean_label", len(src.train), 10)
    noisy = _label_array(table[key], labels, key, len(src.train), 10)
    mismatch = np.flatnonzero(clean != src.train.labels)
    if mismatch.size:  # the file must be aligned with these CIFAR-10 training images
        raise DataError(f"{labels}: clean_label differs from {root} data_batch labels at {mismatch.size} images "
                        f"(first: index {mismatch[0]}); expected CIFAR-10N labels in CIFAR-10 training order")
    src.train.noisy_labels = noisy
    src.name = "cifar10n"
    src.checksum = hashlib.sha256(f"{src.checksum}-{label_set}".encode() + noisy.tobytes()).hexdigest()[:16]
    return src


def _folder(root: str, source: str, default_name: str, probe: str) -> Path:
    """The pickle folder: `root` itself, or `root/<published folder name>`."""
    base = Path(root).expanduser()
    for candidate in (base, base / default_name):
        if (candidate / probe).is_file():
            return candidate
    raise DataError(f"{source}: {base} has no {probe} (expected the python-pickle folder {default_name}/ "
                    f"or its parent; pass --option root=PATH)")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated, not a pickle, or a pickle of something else
        raise DataError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _batch(path: Path, label_key: bytes, num_classes: int,
           coarse_key: bytes | None = None) -> tuple[np.ndarray, ...]:
    obj = _unpickle(path)
    for key in (b"data", label_key) + ((coarse_key,) if coarse_key else ()):
        if key not in obj:
            raise DataError(f"{path}: no {key.decode()} entry (keys: {', '.join(k.decode() for k in obj)})")
    data = np.asarray(obj[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    labels = _label_array(obj[label_key], path, label_key.decode(), len(data), num_classes)
    # Rows are channel-major (1024 R, 1024 G, 1024 B): to (N, 32, 32, 3).
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if coarse_key:
        return pixels, labels, _label_array(obj[coarse_key], path, coarse_key.decode(), len(data), 20)
    return pixels, labels


def _label_array(values, path, what: str, n: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{path}: {what} has shape {arr.shape} dtype {arr.dtype}, expected {n} integers")
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise DataError(f"{path}: {what}[{bad[0]}] = {arr[bad[0]]}, outside [0, {num_classes})")
    return arr.astype(np.int64)


def _names(path: Path, key: bytes, expected: int) -> list[str]:
    obj = _unpickle(path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in obj.get(key, [])]
    if len(names) != expected:
        raise DataError(f"{path}: {key.decode()} has {len(names)} names, expected {expected}")
    return names


def _load_label_file(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10N label file not found (expected CIFAR-10_human.pt from the "
                        "cifar-10-100n repository)")
    try:
        if path.suffix == ".npy":
            obj = np.load(path, allow_pickle=True)
            obj = obj.item() if obj.dtype == object and obj.shape == () else obj
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: unreadable CIFAR-10N label file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict of label arrays, got {type(obj).__name__}")
    return {str(k): (v.numpy() if hasattr(v, "numpy") else v) for k, v in obj.items()}


def _source(name: str, names: list[str], pixels: np.ndarray, labels: np.ndarray,
            test_pixels: np.ndarray, test_labels: np.ndarray) -> SourceData:
    def pool(px: np.ndarray, y: np.ndarray) -> Pool:
        def read(idx: np.ndarray) -> list[bytes]:
            return [encode_image(px[i], "raw") for i in idx]

        def features(idx: np.ndarray) -> np.ndarray:
            # 8x8 average-pooled pixels (instance-dependent noise needs a feature, not 3072 dims).
            small = px[idx].reshape(len(idx), 8, 4, 8, 4, 3).mean(axis=(2, 4), dtype=np.float32)
            return small.reshape(len(idx), -1) / 255.0

        return Pool(labels=y, read=read, pixels=features)

    digest = hashlib.sha256()
    for arr in (pixels, labels, test_pixels, test_labels):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return SourceData(name=name, class_names=names, image_shape=(32, 32, 3), encoding="raw",
                      train=pool(pixels, labels), test=pool(test_pixels, test_labels),
                      checksum=digest.hexdigest()[:16])
