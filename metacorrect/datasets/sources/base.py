"""What a source hands to `prepare`: label arrays in memory, images read lazily by index.

Labels of even a 1M-image source are a few MB, so splits and noise work on whole arrays; images are
read (and encoded) in chunks, so no source has to hold its pixels in memory.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass

import numpy as np


@dataclass
class Pool:
    """A set of images from which splits are drawn."""

    labels: np.ndarray  # int64 true labels, -1 where unknown
    read: Callable[[np.ndarray], list[bytes]]  # indices -> encoded images, in that order
    pixels: Callable[[np.ndarray], np.ndarray] | None = None  # indices -> float features (instance noise)
    noisy_labels: np.ndarray | None = None  # labels that come with the source (real noise)
    # `read` computes its images from a few parameters (nothing loaded to ship to other processes), so large
    # prepares run it in parallel Ray tasks, shard by shard, resumable.
    generated: bool = False

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceData:
    name: str
    class_names: list[str]
    image_shape: tuple[int, int, int]  # H, W, C of every stored image
    encoding: str  # how `Pool.read` encodes: raw | png | jpeg
    train: Pool
    test: Pool | None = None  # a test split of the source's own; else one is held out of `train`
    checksum: str = ""  # identifies the source contents (and its options)
    coarse_of_class: np.ndarray | None = None  # superclass per class (CIFAR-100 pair noise)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class FileList:
    """One split of an image-folder source: image paths (relative to the source root) and their labels."""

    paths: list[str]
    labels: np.ndarray  # int64, what methods see (noisy in noisy_train)
    true_labels: np.ndarray  # int64, -1 where unknown

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> FileList:
        if n is None or n >= len(self.paths):
            return self
        return FileList(self.paths[:n], self.labels[:n], self.true_labels[:n])


@dataclass
class FileSourceData:
    """An image-folder source (Clothing1M, Food-101N): files on disk, decoded and re-encoded by `prepare` on Ray.

    `make_splits(clean_per_class, val_per_class, seed)` returns a FileList per split; sources with
    published splits ignore the arguments and say so in `protocol`.
    """

    name: str
    class_names: list[str]
    root: Path
    make_splits: Callable[[int, int, int], dict[str, FileList]]
    protocol: str  # how the splits are made, one sentence for meta.json and the summary line
    noise_description: str
    image_size: int = 256  # stored images: short side resized to this, centre-cropped square
    quality: int = 90  # JPEG quality of the stored images
    checksum: str = ""
    # Whether known true labels are a fair sample of noisy_train (Clothing1M's clean annotations are; Food-101N's
    # are known only where the label was verified right), i.e. whether a noise rate can be measured from them.
    true_labels_unbiased: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
