"""scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, no download.

Kept at 8x8 (not upscaled): the pixels are the real data, upscaling would add interpolated pixels
and 16x the compute for nothing, and an 8x8 input keeps every test and the demo fast on 2 cores.
Pixel values 0..16 are stretched to 0..255 so every source stores ordinary uint8 images.
"""
from __future__ import annotations

import hashlib

import numpy as np

from metacorrect.datasets.codec import encode_image
from metacorrect.datasets.sources.base import Pool, SourceData


def load_digits_source() -> SourceData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)

    def read(idx: np.ndarray) -> list[bytes]:
        return [encode_image(pixels[i], "raw") for i in idx]

    def features(idx: np.ndarray) -> np.ndarray:
        return pixels[idx].reshape(len(idx), -1).astype(np.float32) / 255.0

    checksum = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()[:16]
    return SourceData(
        name="digits",
        class_names=[str(d) for d in range(10)],
        image_shape=(8, 8, 1),
        encoding="raw",
        train=Pool(labels=labels, read=read, pixels=features),
        checksum=checksum,
    )
