"""Ray Data streams over the prepared shards: read a row group and decode it, in one task -> uint8 batches.

Batches carry uint8 images (4x smaller than float in the object store and on the wire);
augmentation and normalisation run on the worker's device (`augment_images`, `to_model_input`).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metacorrect.datasets.codec import decode_images
from metacorrect.datasets.contract import DataError, DatasetMeta, split_files
from metacorrect.errors import first_line

AUGMENTS = ("none", "shift", "crop_flip")
STRONG_AUGMENTS = ("randaugment", "affine")  # views for methods that ask for them (IEG's pseudo labels)
COLUMNS = ("id", "image", "label", "true_label")


# Decoded bytes one decode task should produce. Ray Data notices a finished task only on its next
# scheduling round (up to 0.1 s later), during which that CPU idles; tasks of one 2,048-row group of
# 64x64 images (0.3 s) lost ~15% of the stream that way, tasks of ~96 MiB (4 such groups) lose ~4%.
TASK_BYTES = 96 * 2**20


def open_split(directory: str | Path, split: str, meta: DatasetMeta, shuffle_files: bool = False,
               decode_concurrency: int | None = None, ids: np.ndarray | None = None):
    """A lazy Ray Dataset of one split with columns id, image (N,H,W,C uint8), label, true_label.

    Each Ray Data task reads a few parquet row groups (~`TASK_BYTES` once decoded, at least 8 tasks a
    split) and yields them decoded, in blocks of ~1/32 of the split (at most 1024 rows) so that a split
    streamed to several workers is dealt out evenly. Reading and decoding in the same task is what a
    DataLoader worker does (benchmarks/data_path.py compares the two). `shuffle_files` deals the row
    groups in a new random order every epoch. `decode_concurrency` caps the parallel decode tasks
    (default: as many as the cluster's CPUs allow). `ids` (sorted) keeps only those rows, dropped before
    their images are decoded.
    """
    import ray.data

    units = row_groups(split_files(directory, split))
    rows = meta.counts.get(split, 0) if ids is None else len(ids)
    row_bytes = int(np.prod(meta.image_shape)) + 8 * (len(COLUMNS) - 1)  # pixels + the int64 columns
    block_rows = max(16, min(1024, rows // 32))
    unit_bytes = max(1, rows * row_bytes // max(1, len(units)))
    units_per_task = max(1, min(round(TASK_BYTES / unit_bytes), len(units) // 8))
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    # A task's yielded batches are coalesced into blocks until they pass the context's target size (this
    # dataset's own context), and a block of 1.5x the target or more is sliced. A target of 0.9 yielded
    # batch makes each yielded batch of `block_rows` rows one block whatever the pixels/column ratio.
    # (A `repartition` stage instead holds a CPU slot of its own unless fused, which a capped decode
    # concurrency prevents: on 2 CPUs the decode then ran one task at a time.)
    ds.context.target_max_block_size = int(0.9 * block_rows * row_bytes)
    if shuffle_files:
        ds = ds.randomize_block_order()
    return ds.map_batches(read_and_decode, batch_size=units_per_task, batch_format="numpy",
                          compute=ray.data.TaskPoolStrategy(size=decode_concurrency),
                          fn_kwargs={"encoding": meta.encoding, "shape": tuple(meta.image_shape),
                                     "block_rows": block_rows, "ids": ids})


def row_groups(files: list[str]) -> list[dict[str, Any]]:
    """One read unit per (file, row group), from the parquet footers alone."""
    return [{"file": f, "group": g} for f in files for g in range(pq.ParquetFile(f).num_row_groups)]


def read_and_decode(units: dict[str, np.ndarray], encoding: str, shape: tuple[int, int, int],
                    block_rows: int, ids: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A Ray Data task: read its row groups and decode them. A row group that cannot be read or an image that
    does not decode is a `DataError` naming the shard (and the id): the data set was damaged after it was
    prepared (prepare decodes every image it writes), so the run stops rather than train on part of it, and
    the error is not retried (`platform/failure_policy.py`)."""
    for file, group in zip(units["file"], units["group"]):
        try:
            table = pq.ParquetFile(str(file)).read_row_group(int(group), columns=list(COLUMNS))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: row group {group} cannot be read ({first_line(e)}); the shard is damaged, "
                            f"prepare the data set again") from None
        if ids is not None:
            column = table["id"].to_numpy()
            at = np.minimum(np.searchsorted(ids, column), max(len(ids) - 1, 0))
            table = table.filter(pa.array(ids[at] == column if len(ids) else np.zeros(len(column), bool)))
        for lo in range(0, table.num_rows, block_rows):
            part = table.slice(lo, block_rows)
            columns = {name: part[name].to_numpy(zero_copy_only=False) for name in COLUMNS}
            try:
                yield decode_batch(columns, encoding, shape)
            except Exception:
                raise _decode_error(file, columns, encoding, shape) from None


def _decode_error(file: str, columns: dict[str, np.ndarray], encoding: str, shape: tuple[int, int, int]) -> DataError:
    """The first image of a batch that fails to decode alone, named by shard and id."""
    for i, blob in enumerate(columns["image"]):
        try:
            decode_images([blob], encoding, shape)
        except Exception as e:
            return DataError(f"{file}: the image of id {int(columns['id'][i])} does not decode as {encoding} "
                             f"{'x'.join(map(str, shape))} ({first_line(e)}); the shard is damaged, prepare the data "
                             f"set again")
    return DataError(f"{file}: a batch of ids {int(columns['id'][0])}..{int(columns['id'][-1])} does not decode")


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


def strong_augment_images(images, policy: str):
    """Strong random augmentation of a uint8 (N,H,W,C) tensor on its own device (IEG's extra views).

    `randaugment`: RandAugment with a random magnitude per op (as in FixMatch): two ops per image out of
    identity, autocontrast, brightness, contrast, colour, posterize, solarize, rotate, shear x/y and
    translate x/y, then a cutout of 1/4 to 1/2 of the side. `affine`: for small grey images such as 8x8
    digits, where colour ops mean little: one random rotation (±15°), shear (±0.25), scale (±10%) and
    translation (±1/8 of the side), then a cutout of 1/4 of the side. Random draws come from torch's
    generator of the tensor's device (the train loop seeds it every epoch).
    """
    import torch

    if policy not in STRONG_AUGMENTS:
        raise ValueError(f"strong augmentation: expected one of {', '.join(STRONG_AUGMENTS)}, got '{policy}'")
    n, h, w, c = images.shape
    if n == 0:
        return images
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    dev = x.device
    if policy == "affine":
        sym = lambda scale: (torch.rand(n, device=dev) * 2 - 1) * scale  # noqa: E731
        x = _affine(x, rotate=sym(15.0), shear_x=sym(0.25), shear_y=torch.zeros(n, device=dev),
                    scale=1 + sym(0.1), tx=sym(0.25), ty=sym(0.25))  # grid units: 2 = the whole side
        x = _cutout(x, torch.full((n,), max(1, h // 4), device=dev))
    else:
        for _ in range(2):
            op = torch.randint(0, len(_RANDAUGMENT_OPS), (n,), device=dev)
            magnitude = torch.rand(n, device=dev)
            sign = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
            for k, name in enumerate(_RANDAUGMENT_OPS):
                rows = (op == k).nonzero().squeeze(1)
                if len(rows):
                    x[rows] = _randaugment_op(name, x[rows], magnitude[rows] * sign[rows], magnitude[rows])
        sides = (h * (0.25 + 0.25 * torch.rand(n, device=dev))).long().clamp(min=1)
        x = _cutout(x, sides)
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_RANDAUGMENT_OPS = ("identity", "autocontrast", "brightness", "contrast", "color", "posterize", "solarize",
                    "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _randaugment_op(name: str, x, signed, magnitude):
    """One RandAugment op on float images in [0, 1], per-sample magnitude in [0, 1] (signed: in [-1, 1])."""
    import torch

    zeros = torch.zeros_like(magnitude)
    view = (-1, 1, 1, 1)
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    if name == "brightness":
        return x * (1 + 0.9 * signed).view(view)
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + (x - mean) * (1 + 0.9 * signed).view(view)
    if name == "color":
        grey = x.mean(dim=1, keepdim=True)
        return grey + (x - grey) * (1 + 0.9 * signed).view(view)
    if name == "posterize":
        levels = (2 ** (8 - (4 * magnitude).round())).view(view)
        return torch.floor(x * 255 / (256 / levels)) * (256 / levels) / 255
    if name == "solarize":
        threshold = (1 - magnitude).view(view)
        return torch.where(x >= threshold, 1 - x, x)
    geometric = {"rotate": dict(rotate=30 * signed), "shear_x": dict(shear_x=0.3 * signed),
                 "shear_y": dict(shear_y=0.3 * signed), "translate_x": dict(tx=0.6 * signed),
                 "translate_y": dict(ty=0.6 * signed)}
    if name in geometric:
        args = dict(rotate=zeros, shear_x=zeros, shear_y=zeros, scale=torch.ones_like(magnitude), tx=zeros,
                    ty=zeros) | geometric[name]
        return _affine(x, **args)
    return x


def _affine(x, rotate, shear_x, shear_y, scale, tx, ty):
    """Per-sample affine warp (degrees, shear factors, scale, translation in grid units), zero fill."""
    import math

    import torch
    import torch.nn.functional as F

    a = rotate * (math.pi / 180.0)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    theta = torch.stack([torch.stack([cos + shear_x * sin, -sin + shear_x * cos, tx], 1),
                         torch.stack([sin + shear_y * cos, cos - shear_y * sin, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(x, sides):
    """A square of side `sides[i]` (pixels) at a random centre of each image set to 0.5 grey."""
    import torch

    n, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (n,), device=dev)
    cx = torch.randint(0, w, (n,), device=dev)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    half = (sides // 2).view(n, 1, 1)
    top, left = (cy.view(n, 1, 1) - half), (cx.view(n, 1, 1) - half)
    mask = (ys >= top) & (ys < top + sides.view(n, 1, 1)) & (xs >= left) & (xs < left + sides.view(n, 1, 1))
    return torch.where(mask.unsqueeze(1), torch.full_like(x, 0.5), x)


def to_model_input(images, mean, std):
    """uint8 (N,H,W,C) tensor -> normalised float (N,C,H,W) on the tensor's device."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
