"""Two real gloo ranks for the "two workers == one worker" tests: rank 1 in a spawned process, rank 0 in the
test process, file rendezvous under the test's tmp_path. float64 and one thread on both ranks."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable

import torch

from metacorrect.platform.collective import Collective

RankResults = Callable[[int, Collective], Any]  # (rank, collective) -> what that rank computed (picklable)


def _rank(results_fn: RankResults, rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()  # rank 0 runs in the test process
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(results_fn(rank, Collective(2, rank)), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either closes its connections: a rank whose peer tore the group down while its
        # gloo threads still used it was seen aborting ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def run_two_ranks(results_fn: RankResults, tmp_path: Path) -> list[Any]:
    """`results_fn` on ranks 0 and 1 of a 2-process gloo group; returns [rank 0's, rank 1's] results.
    `results_fn` must be a module-level function (the spawned rank imports it)."""
    init, out = str(tmp_path / "pg"), str(tmp_path)
    proc = torch.multiprocessing.get_context("spawn").Process(target=_rank, args=(results_fn, 1, init, out))
    proc.start()
    try:
        _rank(results_fn, 0, init, out)
    finally:
        proc.join(timeout=120)
    assert proc.exitcode == 0, f"rank 1 exited with {proc.exitcode}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
