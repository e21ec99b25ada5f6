"""What a worker spends on its clean (meta) batches: the clean set held in memory with a seeded permutation per
pass (the platform's way for clean sets up to 256 MiB decoded) against a new Ray Data iterator per pass through a
local shuffle buffer (the way for larger ones, and before for every one).

Two clean sets of the shapes users meet: digits' 100 images (8x8x1) at clean batch 32, and CIFAR's 1,000
(32x32x3) at clean batch 100, each materialised in a dedicated local Ray instance as a run caches it. For each,
`--passes` passes are drawn both ways, alternated `--repeats` times after one untimed round; printed: the
median CPU time of this process to set the cycle up (the in-memory way reads the set once) and per clean batch
after that, the wall time per batch, and how many times the in-memory way's CPU per batch the other way takes.
(Ray Data's stats actor does a little more work per iterator in its own process, not counted here.)

    python benchmarks/clean_batches.py [--passes 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.platform.batches import CleanCycle, Normaliser  # noqa: E402

SETS = {"digits: 100 clean, batch 32": (100, (8, 8, 1), 32), "CIFAR: 1,000 clean, batch 100": (1000, (32, 32, 3), 100)}
WAYS = {"in memory": 2**40, "an iterator per pass": 0}


def clean_set(rows: int, shape: tuple[int, int, int]):
    rng = np.random.default_rng(0)
    items = [{"id": i, "image": rng.integers(0, 256, shape, dtype=np.uint8), "label": i % 10, "true_label": i % 10}
             for i in range(rows)]
    return ray.data.from_items(items).repartition(4).materialize()


def measure(ds, rows: int, shape, batch: int, in_memory_bytes: int, passes: int) -> tuple[float, float, float]:
    """(setup CPU ms, CPU ms per batch, wall ms per batch) over `passes` passes."""
    norm = Normaliser(torch.zeros(shape[-1]), torch.ones(shape[-1]))
    batches = passes * (rows // batch)
    cpu = time.process_time()
    cycle = CleanCycle(ds.iterator(), batch, torch.device("cpu"), norm, rows, seed=0,
                       set_bytes=rows * (int(np.prod(shape)) + 32), in_memory_bytes=in_memory_bytes)
    setup = 1000 * (time.process_time() - cpu)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(cycle)
    return setup, 1000 * (time.process_time() - cpu) / batches, 1000 * (time.perf_counter() - wall) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        print("| clean set | way | setup CPU ms | CPU ms / batch | wall ms / batch | CPU / batch ÷ in memory |")
        print("|---|---|---|---|---|---|")
        for name, (rows, shape, batch) in SETS.items():
            ds = clean_set(rows, shape)
            got: dict[str, list[tuple[float, float, float]]] = {w: [] for w in WAYS}
            for repeat in range(args.repeats + 1):
                for way, limit in WAYS.items():
                    timed = measure(ds, rows, shape, batch, limit, args.passes)
                    if repeat:  # the first round warms up imports and thread pools
                        got[way].append(timed)
            medians = {w: [statistics.median(t[i] for t in runs) for i in range(3)] for w, runs in got.items()}
            for way, (setup, cpu, wall) in medians.items():
                print(f"| {name} | {way} | {setup:.0f} | {cpu:.2f} | {wall:.2f} | "
                      f"{cpu / medians['in memory'][1]:.1f} |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
