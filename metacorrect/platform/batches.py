"""Worker-side batches: Ray Data shards -> `Batch` on the device (global batches: `global_batches.py`)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metacorrect.datasets.stream import augment_images, strong_augment_images, to_model_input
from metacorrect.methods.base import Batch


@dataclass
class Normaliser:
    mean: Tensor
    std: Tensor

    @classmethod
    def from_meta(cls, meta, device: torch.device) -> Normaliser:
        return cls(torch.tensor(meta.pixel_mean, device=device), torch.tensor(meta.pixel_std, device=device))

    def __call__(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.mean, self.std)


def to_batch(raw: dict[str, Tensor], norm: Normaliser, augment: str = "none", views: int = 0,
             strong: str = "randaugment") -> tuple[Batch, Tensor]:
    """(what the method may see, the true labels kept back for metrics).

    `views` > 0 adds that many strongly augmented views (`strong` policy) of the same images, made here on
    the worker's device from the weakly augmented uint8 images, as `Batch.views` (K, N, C, H, W)."""
    ids = raw["id"]
    images = augment_images(raw["image"], augment)
    extra = torch.stack([norm(strong_augment_images(images, strong)) for _ in range(views)]) if views else None
    return Batch(ids=ids, x=norm(images), label=raw["label"], weight=float(len(ids)), views=extra), raw["true_label"]


def iterate(shard, batch_size: int, device: torch.device, shuffle_buffer: int = 0, seed: int | None = None,
            drop_last: bool = False) -> Iterator[dict[str, Tensor]]:
    kwargs = {}
    if shuffle_buffer > 0:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    return shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                    prefetch_batches=2, **kwargs)


def empty_rows(meta, device: torch.device) -> dict[str, Tensor]:
    """Zero rows with the columns (dtype, image shape) that `iterate` yields for this data set."""
    long = torch.zeros(0, dtype=torch.int64, device=device)
    image = torch.zeros((0, *meta.image_shape), dtype=torch.uint8, device=device)
    return {"id": long, "image": image, "label": long.clone(), "true_label": long.clone()}


# A clean set up to this size once decoded is held in memory by each worker (see `CleanCycle`).
CLEAN_IN_MEMORY_BYTES = 256 * 2**20


class CleanCycle:
    """Endless clean (meta) batches from this worker's full copy of the clean set, reshuffled every pass.

    Each pass's order is seeded by (seed, epoch, pass), so a resumed run draws the same clean batches. A clean
    set of at most `in_memory_bytes` once decoded (`set_bytes`: digits, CIFAR's few thousand clean images) is
    read once, sorted by id and held on the device, and each pass is a seeded permutation of it: a small clean
    set is gone through every few steps, and opening a Ray Data iterator for each pass costs ~20 ms of the
    worker's CPU (~45 ms with Ray Data's other processes), hundreds of clean batches of digits from memory.
    There every worker draws the same global batch of `batch_size * world` rows and takes its own part of it
    (`rank`), so the workers' clean batches together are, row for row, the batch one worker would draw with the
    same seed: no row twice in a step, each pass over the set once, whatever the number of workers.
    A larger clean set (Clothing1M's 47k images) streams from Ray Data every pass through a local shuffle
    buffer, each worker in an order of its own (its blocks may arrive in another order than the others').
    """

    def __init__(self, shard, batch_size: int, device: torch.device, norm: Normaliser, num_rows: int, seed: int,
                 augment: str = "none", *, set_bytes: int, rank: int = 0, world: int = 1,
                 in_memory_bytes: int = CLEAN_IN_MEMORY_BYTES):
        self.shard, self.batch_size, self.device, self.norm, self.augment = shard, batch_size, device, norm, augment
        self.seed, self.rank, self.world = seed, rank, world
        self.rows = _read_sorted(shard, device) if set_bytes <= in_memory_bytes else None
        # in memory the passes are over global batches; streamed, over this worker's own
        self.drop_last = num_rows >= batch_size * (world if self.rows is not None else 1)
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Restart at a pass seeded by the epoch, so a resumed run draws the same clean batches."""
        self.epoch, self.passes, self.drawn = epoch, 0, 0
        self._it: Iterator | None = None

    def position(self) -> tuple[int, int]:
        """(passes started this epoch, batches drawn from the current one): where `seek` comes back to."""
        return self.passes, self.drawn

    def seek(self, passes: int, drawn: int) -> None:
        """Continue where `position()` was taken (in the same epoch). The skipped batches are not augmented,
        so no random number is drawn for them."""
        self.passes, self.drawn, self._it = max(passes - 1, 0), 0, None
        if passes:
            self._open()
            for _ in range(drawn):
                next(self._it)
            self.drawn = drawn

    def template(self) -> Batch:
        """A clean batch as it comes, for its shapes: the cycle's position and the generators are untouched."""
        if self.rows is None:
            raw = next(iter(iterate(self.shard, self.batch_size, self.device)), None)
        else:
            raw = {k: v[:self.batch_size] for k, v in self.rows.items()} or None
        if raw is None:
            raise RuntimeError("the clean (meta) split is empty; prepare the data set with --clean-per-class > 0")
        return to_batch(raw, self.norm)[0]

    def _open(self) -> None:
        # A seed of its own for each (run's seed, epoch, pass): at scale an epoch holds thousands of passes over
        # a small clean set, and none of them may repeat the order of a pass in another epoch.
        entropy = [self.seed, self.epoch, self.passes]
        if self.rows is not None:
            self._it = self._permuted(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        else:
            seed = int(np.random.SeedSequence(entropy + [self.rank]).generate_state(1)[0])
            self._it = iter(iterate(self.shard, self.batch_size, self.device, shuffle_buffer=4096, seed=seed,
                                    drop_last=self.drop_last))
        self.passes += 1
        self.drawn = 0

    def _permuted(self, seed: int) -> Iterator[dict[str, Tensor]]:
        """One pass over the in-memory rows in the order of a permutation seeded by `seed` (its own generator,
        on the CPU, so the order is the same on every device and every worker and leaves the global generators
        alone), in global batches of which this worker yields its part: the rows split as evenly as they go
        (a global batch of fewer rows than workers, from a tiny clean set, goes whole to each)."""
        n = len(self.rows.get("id", ()))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device)
        size = self.batch_size * self.world
        end = n - n % size if self.drop_last else n
        for lo in range(0, end, size):
            take = order[lo:lo + size]
            if len(take) >= self.world:
                take = torch.tensor_split(take, self.world)[self.rank]
            yield {k: v[take] for k, v in self.rows.items()}

    def __next__(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._open()
            raw = next(self._it, None)
            if raw is not None:
                self.drawn += 1
                return to_batch(raw, self.norm, self.augment)[0]
            self._it = None
        raise RuntimeError("the clean (meta) split is empty; prepare the data set with --clean-per-class > 0")


def _read_sorted(shard, device: torch.device) -> dict[str, Tensor]:
    """Every row of `shard`, on `device`, in id order (whatever order Ray Data delivered the blocks in)."""
    parts = list(iterate(shard, 1024, device))
    if not parts:
        return {}
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(rows["id"])
    return {k: v[order] for k, v in rows.items()}
