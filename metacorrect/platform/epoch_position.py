"""Where a worker stands inside an epoch: what a step checkpoint adds to an epoch checkpoint.

A checkpoint taken mid-epoch (`train.checkpoint_every`) must let the run continue that epoch as if it had not
stopped: the rest of the epoch trains on exactly the noisy ids not trained on yet, each once. Each worker
writes a file of its own into the checkpoint directory (Ray merges the workers' files into one checkpoint):
the ids it trained on this epoch (a bitmap: 1M ids are 125 KB packed), its random number generators, its
position in the clean-batch cycle and its running sums of the epoch's step metrics. On resume every worker
reads every worker's bitmap, so the union is skipped whatever worker held which rows.

The skipped rows are dropped from the worker's stream after decoding, in the order the shuffle buffer gives
them, so with one worker and a fixed block order the rest of the epoch sees the same batches as an
uninterrupted run. Dropping before decoding would save the decode of the rows already trained on but change
the shuffle buffer's input and so the batches; decoding is a fraction of a training step's cost per row.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

RANK_FILE = "position_rank{rank}.pt"


def rank_file(rank: int) -> str:
    return RANK_FILE.format(rank=rank)


@dataclass
class EpochSums:
    """This worker's running, row-weighted sums of the epoch's step metrics."""

    sums: dict[str, float] = field(default_factory=dict)
    counted: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, out: dict[str, float], weight: float) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
            self.counted[k] = self.counted.get(k, 0.0) + weight
        self.weight += weight

    def merge(self, other: EpochSums) -> None:
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counted[k] = self.counted.get(k, 0.0) + other.counted[k]
        self.weight += other.weight


class ConsumedIds:
    """The noisy ids trained on so far in this epoch (this worker's, or the union of all workers' on resume)."""

    def __init__(self, num_ids: int, device: torch.device | str = "cpu"):
        self.mask = torch.zeros(num_ids, dtype=torch.bool, device=device)

    def mark(self, ids: Tensor) -> None:
        self.mask[ids.to(self.mask.device)] = True

    def count(self) -> int:
        return int(self.mask.sum())

    def packed(self) -> np.ndarray:
        return np.packbits(self.mask.cpu().numpy())

    def add_packed(self, bits: np.ndarray) -> None:
        unpacked = np.unpackbits(bits, count=self.mask.numel()).astype(bool)
        self.mask |= torch.from_numpy(unpacked).to(self.mask.device)

    def skip(self, stream: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """`stream` without the rows whose ids are marked."""
        for rows in stream:
            keep = ~self.mask[rows["id"].to(self.mask.device)].to(rows["id"].device)
            if bool(keep.all()):
                yield rows
            elif bool(keep.any()):
                yield {k: v[keep] for k, v in rows.items()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resumed:
    """What this worker continues from inside an epoch."""

    consumed: ConsumedIds
    sums: EpochSums
    rng: dict[str, Any] | None  # None when the checkpoint came from a different number of workers
    clean_position: tuple[int, int] | None


def read_positions(states: dict[int, dict[str, Any]], rank: int, world: int, num_ids: int,
                   device: torch.device | str = "cpu") -> Resumed:
    """This worker's position from every worker's file of a mid-epoch checkpoint (by rank): the union of their
    consumed ids; its own generators and clean-cycle position (when the world size is unchanged); and the
    running sums of its own file plus those of ranks that no longer exist (so none are lost when the run
    resumes on fewer workers)."""
    consumed = ConsumedIds(num_ids, device)
    sums = EpochSums()
    for r, s in states.items():
        consumed.add_packed(s["consumed"])
        if r % world == rank:
            sums.merge(EpochSums(**s["sums"]))
    same = len(states) == world and rank in states
    own = states.get(rank) if same else None
    return Resumed(consumed, sums, own["rng"] if own else None, tuple(own["clean"]) if own else None)


def write_position(directory: Path, rank: int, consumed: ConsumedIds, sums: EpochSums,
                   clean_position: tuple[int, int]) -> None:
    torch.save({"consumed": consumed.packed(), "sums": vars(sums), "rng": rng_state(), "clean": clean_position},
               directory / rank_file(rank))
