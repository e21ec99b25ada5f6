"""Ray Data streams over the prepared shards: read parquet -> decode -> uint8 batches.

Batches carry uint8 images (4x smaller than float in the object store and on the wire);
augmentation and normalisation run on the worker's device (`augment_images`, `to_model_input`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metacorrect.datasets.codec import decode_images
from metacorrect.datasets.contract import DatasetMeta, split_files

AUGMENTS = ("none", "shift", "crop_flip")
SMALL_SPLIT_FILES = 16  # below this many shards a split is re-blocked before decode (64 MiB shards: < 1 GiB)


def open_split(directory: str | Path, split: str, meta: DatasetMeta, shuffle_files: bool = False,
               decode_concurrency: int | None = None):
    """A lazy Ray Dataset of one split with columns id, image (N,H,W,C uint8), label, true_label.

    Blocks are kept to ~1/32 of the split (at most 1024 rows) so that a split streamed to several
    workers is dealt out evenly, and so that decode runs in parallel from the first file on: a split
    stored as a few files is cut into blocks of still-encoded rows *before* decode (a streaming split of
    each read block, no all-to-all barrier), otherwise one file would be decoded by one task.
    `decode_concurrency` caps the parallel decode tasks (default: as many as the cluster's CPUs allow).
    """
    import ray.data

    files = split_files(directory, split)
    rows = meta.counts.get(split, 0)
    block_rows = max(16, min(1024, rows // 32))
    ds = ray.data.read_parquet(files, shuffle="files" if shuffle_files else None)
    if len(files) < SMALL_SPLIT_FILES:
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=block_rows,
                          compute=ray.data.TaskPoolStrategy(size=decode_concurrency),
                          fn_kwargs={"encoding": meta.encoding, "shape": tuple(meta.image_shape)})


def decoded_bytes(meta: DatasetMeta, split: str) -> int:
    """Size of a split once decoded to uint8 (what materialising it in the object store costs)."""
    return int(meta.counts.get(split, 0) * (int(np.prod(meta.image_shape)) + 32))


def decode_batch(batch: dict[str, np.ndarray], encoding: str, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    return {"id": batch["id"].astype(np.int64), "image": decode_images(batch["image"], encoding, shape),
            "label": batch["label"].astype(np.int64), "true_label": batch["true_label"].astype(np.int64)}


def augment_images(images, augment: str):
    """Random augmentation of a uint8 (N,H,W,C) tensor on its own device (training batches only).

    `shift`: translation by up to 1/8 of the side (digits); `crop_flip`: pad-4 random crop + h-flip (CIFAR).
    Done on the worker, after decoding, so decoded splits can be cached and still get fresh draws
    every epoch, and on a GPU it costs the data path nothing.
    """
    import torch
    import torch.nn.functional as F

    if augment == "none":
        return images
    n, h, w, _ = images.shape
    pad = max(1, h // 8) if augment == "shift" else 4
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (n,), device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]
    cols = dx[:, None] + torch.arange(w, device=dev)[None, :]
    out = padded[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if augment == "crop_flip":
        flip = torch.rand(n, device=dev) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(2), out)
    return out


def to_model_input(images, mean, std):
    """uint8 (N,H,W,C) tensor -> normalised float (N,C,H,W) on the tensor's device."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
