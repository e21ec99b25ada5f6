"""What a source hands to `prepare`: label arrays in memory, images read lazily by index.

Labels of even a 1M-image source are a few MB, so splits and noise work on whole arrays; images are
read (and encoded) in chunks, so no source has to hold its pixels in memory.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Pool:
    """A set of images from which splits are drawn."""

    labels: np.ndarray  # int64 true labels, -1 where unknown
    read: Callable[[np.ndarray], list[bytes]]  # indices -> encoded images, in that order
    pixels: Callable[[np.ndarray], np.ndarray] | None = None  # indices -> float features (instance noise)
    noisy_labels: np.ndarray | None = None  # labels that come with the source (real noise)

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
