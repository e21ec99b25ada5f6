"""The clean (meta) batches: a small clean set is held in memory and each pass is a seeded permutation of it; a
large one streams from Ray Data. Both cover the set each pass, repeat under the same seed and come back to
where a checkpoint was taken (real Ray Data datasets on the suite's cluster)."""
from __future__ import annotations

import numpy as np
import pytest
import ray.data
import torch

from metacorrect.platform.batches import CleanCycle, Normaliser

ROWS = 50
CPU = torch.device("cpu")


def clean_set(order: np.ndarray, blocks: int = 4, preserve_order: bool = False):
    items = [{"id": int(i), "image": np.full((2, 2, 1), i % 256, dtype=np.uint8), "label": int(i % 10),
              "true_label": int(i % 10)} for i in order]
    ds = ray.data.from_items(items).repartition(blocks).materialize()
    ds.context.execution_options.preserve_order = preserve_order  # what `data.deterministic` sets
    return ds


def cycle(ds, batch_size: int = 8, seed: int = 0, in_memory: bool = True, rank: int = 0, world: int = 1) -> CleanCycle:
    norm = Normaliser(torch.zeros(1), torch.ones(1))
    return CleanCycle(ds.iterator(), batch_size, CPU, norm, ROWS, seed, set_bytes=ROWS * 36, rank=rank, world=world,
                      in_memory_bytes=2**20 if in_memory else 0)


def ids(c: CleanCycle, n: int) -> list[list[int]]:
    return [next(c).ids.tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def in_order(ray_cluster):
    return clean_set(np.arange(ROWS))


@pytest.fixture(scope="module")
def deterministic(ray_cluster):
    return clean_set(np.arange(ROWS), preserve_order=True)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_each_pass_draws_every_full_batch_of_the_set_once_in_a_new_order(in_order, in_memory):
    c = cycle(in_order, in_memory=in_memory)
    assert (c.rows is not None) == in_memory
    passes = [ids(c, ROWS // 8) for _ in range(3)]
    for p in passes:  # 6 full batches of 8; the 2 rows left over wait for a later pass
        drawn = [i for batch in p for i in batch]
        assert all(len(b) == 8 for b in p) and len(set(drawn)) == 48 and set(drawn) <= set(range(ROWS))
    assert passes[0] != passes[1] != passes[2]
    assert c.position() == (3, 6)


def test_the_same_seed_draws_the_same_batches_whatever_order_the_blocks_came_in(in_order):
    shuffled = clean_set(np.random.default_rng(1).permutation(ROWS), blocks=3)
    assert ids(cycle(in_order, seed=5), 20) == ids(cycle(shuffled, seed=5), 20)
    assert ids(cycle(in_order, seed=5), 20) != ids(cycle(in_order, seed=6), 20)


@pytest.mark.parametrize("batch_size", [8, 64], ids=["batches", "smaller_than_a_batch"])
def test_two_workers_draw_together_the_clean_batches_one_worker_draws(in_order, batch_size):
    """In memory every worker draws the same global batch and takes its part: the two parts of each step are,
    row for row, one worker's batch of the same seed (no row twice in a step), through passes and epochs."""
    one = cycle(in_order, batch_size=batch_size, seed=3)
    two = [cycle(in_order, batch_size=batch_size // 2, seed=3, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        for c in (one, *two):
            c.start_epoch(epoch)
        for _ in range(8):  # more than a pass: at batch 8, 6 global batches make one; at 64, one (the whole set)
            together = [i for c in two for i in next(c).ids.tolist()]
            assert together == next(one).ids.tolist()
    assert two[0].position() == two[1].position() == one.position()


def test_streamed_workers_draw_orders_of_their_own(deterministic):
    """A streamed clean set: each worker shuffles its own stream (its blocks may come in another order)."""
    assert ids(cycle(deterministic, in_memory=False, rank=0, world=2), 6) != \
        ids(cycle(deterministic, in_memory=False, rank=1, world=2), 6)


def test_a_new_epoch_starts_a_new_order_that_a_resumed_run_repeats(in_order):
    a, b = cycle(in_order), cycle(in_order)
    first = ids(a, 6)
    a.start_epoch(1)
    b.start_epoch(1)
    assert ids(a, 6) == ids(b, 6) != first


def test_seek_continues_where_the_position_was_taken(in_order):
    seek_and_compare(in_order, in_memory=True)


def test_seek_of_a_streamed_set_continues_where_the_position_was_taken_when_the_blocks_keep_their_order(
        deterministic):
    seek_and_compare(deterministic, in_memory=False)


def seek_and_compare(ds, in_memory: bool) -> None:
    a = cycle(ds, in_memory=in_memory)
    ids(a, 9)  # into the second pass
    at = a.position()
    rest = ids(a, 10)
    b = cycle(ds, in_memory=in_memory)
    b.seek(*at)
    assert b.position() == at
    assert ids(b, 10) == rest


def test_a_set_smaller_than_the_batch_is_drawn_whole_every_pass(in_order):
    c = cycle(in_order, batch_size=64)
    assert [sorted(b) for b in ids(c, 2)] == [list(range(ROWS))] * 2
    assert c.template().x.shape == (ROWS, 1, 2, 2)


def test_an_empty_clean_set_names_the_flag_that_fills_it(ray_cluster):
    empty = ray.data.from_items([{"id": 0, "image": np.zeros((2, 2, 1), np.uint8), "label": 0, "true_label": 0}])
    c = cycle(empty.limit(0).materialize())
    with pytest.raises(RuntimeError, match="--clean-per-class"):
        next(c)
    with pytest.raises(RuntimeError, match="--clean-per-class"):
        c.template()


def test_no_pass_repeats_the_order_of_a_pass_of_another_epoch(in_order):
    """At scale an epoch holds thousands of passes over a small clean set (1,000 clean at batch 100 and 15,000
    steps an epoch: 1,500 passes); pass 1,000 of epoch 0 must not be pass 0 of epoch 1."""
    late, next_epoch = cycle(in_order), cycle(in_order)
    late.seek(1001, 0)  # the start of pass 1,000 (counting from 0)
    next_epoch.start_epoch(1)
    assert ids(late, 6) != ids(next_epoch, 6)
