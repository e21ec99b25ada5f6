"""Class-conditional generated images at any N, size and class count (scale tests, benchmarks).

Each class has a smooth random prototype; an image is its class prototype, randomly shifted, plus
pixel noise. Images are generated in fixed blocks seeded by (seed, block), so image i is the same
whatever order or chunking reads it, and nothing is held in memory beyond one block.
"""
from __future__ import annotations

import hashlib

import numpy as np

from metacorrect.datasets.codec import ENCODINGS, encode_image
from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import Pool, SourceData

BLOCK = 1024


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
    protos = protos / (np.abs(protos).max(axis=(1, 2, 3), keepdims=True) + 1e-8)

    def block_pixels(b: int) -> np.ndarray:
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        brng = np.random.default_rng([seed, 1, b])
        shifts = brng.integers(-2, 3, size=(hi - lo, 2))
        base = protos[labels[lo:hi]]
        shifted = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(base, shifts)])
        img = 128 + 90 * shifted + brng.normal(0, noise_std, size=shifted.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def pixels_of(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), image_size, image_size, channels), np.uint8)
        blocks = idx // BLOCK
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = block_pixels(int(b))[idx[sel] - b * BLOCK]
        return out

    def read(idx: np.ndarray) -> list[bytes]:
        return [encode_image(img, encoding) for img in pixels_of(idx)]

    def features(idx: np.ndarray) -> np.ndarray:
        # 8x8 average-pooled pixels: enough for instance-dependent noise, cheap at 1M images.
        px = pixels_of(idx).astype(np.float32) / 255.0
        f = image_size // 8 if image_size >= 8 else 1
        px = px[:, : (image_size // f) * f, : (image_size // f) * f]
        pooled = px.reshape(len(idx), image_size // f, f, image_size // f, f, channels).mean(axis=(2, 4))
        return pooled.reshape(len(idx), -1)

    key = f"{n}-{num_classes}-{image_size}-{channels}-{noise_std}-{encoding}-{seed}"
    return SourceData(
        name="synthetic",
        class_names=[f"class_{c}" for c in range(num_classes)],
        image_shape=(image_size, image_size, channels),
        encoding=encoding,
        train=Pool(labels=labels, read=read, pixels=features),
        checksum=hashlib.sha256(key.encode()).hexdigest()[:16],
    )
