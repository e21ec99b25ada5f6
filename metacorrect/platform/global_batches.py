"""Global batches of the same sizes on any number of workers: `train.batch_size` rows every step, and the
epoch's remainder (N mod batch_size rows) in its last step, exactly as one worker would take them.

Each worker streams its own shard, and shards differ in length (rows are not dropped to even them out). If
every worker simply batched its own shard, the end of an epoch would bring steps whose global batch is a few
rows: shards of 578 and 560 rows in local batches of 32 end with a step of 2 rows on one worker and none on
the other. Methods that scale a per-sample step by 1 / (rows in the batch) then move those rows 32x as far as
usual; MSLG's label logits flip hard and the next real step, a reversed KL against those labels, wrecks the
student (that was the two-worker collapse on digits). Here the workers agree, every step, on how many rows
each holds; while every worker has a full local batch nothing else happens, and at the tail rows that a
worker holds beyond its share are handed over to the workers that are short (one all-gather per column, only
in the last steps of an epoch). No worker ever takes more than its local batch, and every row of the epoch
is used once.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from metacorrect.platform.collective import Collective

Rows = dict[str, Tensor]  # column -> tensor with the rows along dim 0 (id, image, label, true_label)


class _Buffer:
    """Rows pulled from one worker's stream and not yet dealt."""

    def __init__(self, stream: Iterable[Rows], template: Rows):
        self.stream = iter(stream)
        self.parts: list[Rows] = []
        self.rows = 0
        self.exhausted = False
        self.template = template  # zero-row columns with the right dtype and trailing shape

    def fill(self, rows: int) -> None:
        while self.rows < rows and not self.exhausted:
            part = next(self.stream, None)
            if part is None:
                self.exhausted = True
                break
            n = len(part["id"])
            if n:
                self.parts.append(part)
                self.rows += n
                self.template = {k: v[:0] for k, v in part.items()}

    def take(self, n: int) -> Rows:
        out, need = [], n
        while need:
            part = self.parts[0]
            m = len(part["id"])
            if m <= need:
                out.append(self.parts.pop(0))
                need -= m
            else:
                out.append({k: v[:need] for k, v in part.items()})
                self.parts[0] = {k: v[need:] for k, v in part.items()}
                need = 0
        self.rows -= n
        if not out:
            return dict(self.template)
        return out[0] if len(out) == 1 else {k: torch.cat([p[k] for p in out]) for k in out[0]}


def plan_step(rows: list[int], global_batch: int) -> tuple[list[int], list[int], list[int]]:
    """For the rows each worker holds now: (rows each keeps, rows each hands over, rows each receives).

    The step takes min(global_batch, sum(rows)) rows, as even as possible over the workers; a worker short of
    its share keeps all it has and receives the rest from workers holding more, in rank order."""
    world = len(rows)
    total = min(global_batch, sum(rows))
    targets = [total // world + (i < total % world) for i in range(world)]
    keep = [min(r, t) for r, t in zip(rows, targets)]
    missing = total - sum(keep)
    give = []
    for r, k in zip(rows, keep):
        g = min(r - k, missing)
        give.append(g)
        missing -= g
    receive = [t - k for t, k in zip(targets, keep)]
    return keep, give, receive


def global_batches(stream: Iterable[Rows], global_batch: int, collective: Collective,
                   template: Rows) -> Iterator[Rows | None]:
    """This worker's share of each global batch of the epoch (None: no rows for it in this step).

    `stream`: this worker's shard in local batches (global_batch / world rows); `template`: zero-row columns
    (dtype, trailing shape, device) for a worker whose shard is empty."""
    world, rank = collective.world_size, collective.rank
    local = global_batch // world
    buf = _Buffer(stream, template)
    while True:
        buf.fill(local)
        rows, exhausted = _gather_counts(buf, collective)
        if min(rows) >= local:  # every worker has a full local batch: the usual step, no exchange
            yield buf.take(local)
            continue
        if not all(exhausted):  # the tail: workers still streaming buffer enough to cover the short ones
            buf.fill(global_batch)
            rows, exhausted = _gather_counts(buf, collective)
        if sum(rows) == 0:
            return
        keep, give, receive = plan_step(rows, global_batch)
        mine = buf.take(keep[rank])
        if sum(give):
            handed = buf.take(give[rank])
            pool = {k: collective.all_gather(v) for k, v in handed.items()}  # every handed row, in rank order
            start = sum(receive[:rank])
            mine = {k: torch.cat([v, pool[k][start:start + receive[rank]]]) for k, v in mine.items()}
        yield mine if len(mine["id"]) else None


def _gather_counts(buf: _Buffer, collective: Collective) -> tuple[list[int], list[bool]]:
    if not collective.distributed:
        return [buf.rows], [buf.exhausted]
    mine = torch.tensor([buf.rows, int(buf.exhausted)], dtype=torch.int64, device=collective.device)
    counts = collective.stack(mine).tolist()
    return [int(r) for r, _ in counts], [bool(e) for _, e in counts]
