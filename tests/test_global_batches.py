"""Global batches: on two real gloo ranks with uneven shards, every step holds `batch_size` rows in all (the
epoch's last one N mod batch_size), as one worker's steps do; no worker holds more than its local batch; every
row is used once."""
from __future__ import annotations

import torch

from gloo import run_two_ranks
from metacorrect.platform.collective import Collective
from metacorrect.platform.global_batches import global_batches, plan_step

SHAPE = (4, 4, 1)
TEMPLATE = {"id": torch.zeros(0, dtype=torch.long), "image": torch.zeros((0, *SHAPE), dtype=torch.uint8),
            "label": torch.zeros(0, dtype=torch.long), "true_label": torch.zeros(0, dtype=torch.long)}
# (rows of rank 0's shard, rows of rank 1's shard): the digits split that collapsed MSLG, a very uneven one,
# and an empty shard
SHARDS = ((578, 560), (700, 438), (100, 0))


def _stream(ids: torch.Tensor, local: int):
    """A shard as Ray Data yields it: local batches, the last one short; images carry their id."""
    for lo in range(0, len(ids), local):
        part = ids[lo:lo + local]
        yield {"id": part, "image": (part % 251).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, *SHAPE).contiguous(),
               "label": part % 10, "true_label": part % 7}


def _deal(rank: int, collective: Collective) -> list[list]:
    """Per scenario, per step: (ids this rank got, and whether its columns still belong together)."""
    out = []
    for sizes in SHARDS:
        start = sum(sizes[:rank])
        ids = torch.arange(start, start + sizes[rank])
        steps = []
        for rows in global_batches(_stream(ids, 32), 64, collective, TEMPLATE):
            if rows is None:
                steps.append(([], True))
                continue
            consistent = bool((rows["image"][:, 0, 0, 0] == (rows["id"] % 251).to(torch.uint8)).all()
                              and (rows["label"] == rows["id"] % 10).all() and (rows["true_label"] == rows["id"] % 7).all())
            steps.append((rows["id"].tolist(), consistent))
        out.append(steps)
    return out


def test_plan_hands_over_only_what_the_short_workers_lack():
    assert plan_step([32, 32], 64) == ([32, 32], [0, 0], [0, 0])
    keep, give, receive = plan_step([40, 2], 64)
    assert (keep, give, receive) == ([21, 2], [19, 0], [0, 19]), "42 rows: 21 each, rank 0 hands 19 to rank 1"
    keep, give, receive = plan_step([64, 10], 64)
    assert (keep, give, receive) == ([32, 10], [22, 0], [0, 22])
    assert plan_step([0, 0], 64) == ([0, 0], [0, 0], [0, 0])


def test_two_workers_take_the_steps_one_worker_takes(tmp_path):
    rank0, rank1 = run_two_ranks(_deal, tmp_path)
    for sizes, steps0, steps1 in zip(SHARDS, rank0, rank1):
        total = sum(sizes)
        assert len(steps0) == len(steps1), "both ranks step together"
        global_sizes = [len(a) + len(b) for (a, _), (b, _) in zip(steps0, steps1)]
        one_worker = [64] * (total // 64) + ([total % 64] if total % 64 else [])
        assert global_sizes == one_worker, (sizes, global_sizes)
        assert all(len(ids) <= 32 for ids, _ in steps0 + steps1), "no worker takes more than its local batch"
        seen = [i for ids, _ in steps0 + steps1 for i in ids]
        assert sorted(seen) == list(range(total)), "every row once"
        assert all(ok for _, ok in steps0 + steps1), "handed-over rows keep their columns together"


def test_one_worker_takes_its_stream_as_it_comes():
    steps = [rows["id"].tolist() for rows in global_batches(_stream(torch.arange(150), 64), 64, Collective(),
                                                             TEMPLATE)]
    assert [len(s) for s in steps] == [64, 64, 22]
    assert sum(steps, []) == list(range(150))
