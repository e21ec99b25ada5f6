"""Class-conditional generated images at any N, size and class count (scale tests, benchmarks).

Each class has a smooth random prototype; an image is its class prototype, randomly shifted, plus
pixel noise. Image i is drawn from its own generator seeded by (seed, i), so it is the same whatever order,
chunking or process reads it, reading any subset costs only that subset, and nothing is held in memory
beyond the images asked for. Pools from here are marked `generated`: large prepares run them on Ray.
"""
from __future__ import annotations

import hashlib
from statistics import NormalDist

import numpy as np

from metacorrect.datasets.codec import ENCODINGS, encode_image
from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import Pool, SourceData



def load_synthetic_source(n: int = 2000, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                          noise_std: float = 40.0, encoding: str | None = None, seed: int = 0) -> SourceData:
    if n < num_classes or num_classes < 2:
        raise DataError(f"synthetic: need num_classes >= 2 and n >= num_classes, got n={n}, num_classes={num_classes}")
    if image_size < 4 or channels not in (1, 3):
        raise DataError(f"synthetic: need image_size >= 4 and channels 1 or 3, got {image_size}, {channels}")
    encoding = encoding or ("raw" if image_size <= 32 else "jpeg")
    if encoding not in ENCODINGS:
        raise DataError(f"synthetic: encoding '{encoding}' (expected one of {', '.join(ENCODINGS)})")

    rng = np.random.default_rng([seed, 0])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    coarse = rng.normal(size=(num_classes, 4, 4, channels))
    reps = -(-image_size // 4)
    protos = np.kron(coarse, np.ones((1, reps, reps, 1)))[:, :image_size, :image_size]
    protos = np.rint(128 + 90 * protos / (np.abs(protos).max(axis=(1, 2, 3), keepdims=True) + 1e-8)).astype(np.int16)
    # Gaussian pixel noise from random bytes through the normal quantiles of 256 equiprobable levels: a table
    # look-up in int16 instead of float draws and arithmetic (4x less work at 1M images).
    quantiles = NormalDist().inv_cdf
    noise_of_byte = np.array([round(noise_std * quantiles((k + 0.5) / 256)) for k in range(256)], np.int16)
    shape = (image_size, image_size, channels)

    def pixels_of(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        noise = np.empty((len(idx), *shape), np.uint8)
        shifts = np.empty((len(idx), 2), np.int64)
        for k, i in enumerate(idx):
            irng = np.random.default_rng([seed, 1, int(i)])
            shifts[k] = irng.integers(-2, 3, size=2)
            noise[k] = np.frombuffer(irng.bytes(noise[k].size), np.uint8).reshape(shape)
        # The class prototype rolled by each image's shift, gathered for the whole batch at once.
        rows = (np.arange(image_size)[None, :] - shifts[:, :1]) % image_size
        cols = (np.arange(image_size)[None, :] - shifts[:, 1:]) % image_size
        img = protos[labels[idx][:, None, None], rows[:, :, None], cols[:, None, :]]
        img += noise_of_byte[noise]
        return np.clip(img, 0, 255).astype(np.uint8)

    def read(idx: np.ndarray) -> list[bytes]:
        return [encode_image(img, encoding) for img in pixels_of(idx)]

    def features(idx: np.ndarray) -> np.ndarray:
        # 8x8 average-pooled pixels: enough for instance-dependent noise, cheap at 1M images.
        px = pixels_of(idx).astype(np.float32) / 255.0
        f = image_size // 8 if image_size >= 8 else 1
        px = px[:, : (image_size // f) * f, : (image_size // f) * f]
        pooled = px.reshape(len(idx), image_size // f, f, image_size // f, f, channels).mean(axis=(2, 4))
        return pooled.reshape(len(idx), -1)

    key = f"v2-{n}-{num_classes}-{image_size}-{channels}-{noise_std}-{encoding}-{seed}"
    return SourceData(
        name="synthetic",
        class_names=[f"class_{c}" for c in range(num_classes)],
        image_shape=(image_size, image_size, channels),
        encoding=encoding,
        train=Pool(labels=labels, read=read, pixels=features, generated=True),
        checksum=hashlib.sha256(key.encode()).hexdigest()[:16],
    )
