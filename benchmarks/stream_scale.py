"""Memory of one epoch streamed to 2 training workers, at any scale (the 1M-image row in docs/benchmarks.md).

Opens the noisy split of a prepared data set as the trainer does (`open_split`, shuffled row groups,
`streaming_split` into one shard per worker) and has 2 Ray actors iterate their shards as torch batches.
Printed: rows per worker, seconds, the RSS growth and peak of each worker (from its 20th batch on) and of
the driver, each worker's private-memory (RssAnon) growth (RSS also counts the pages of Ray's shared object
store that a worker reads blocks from), the object store's peak use, and the decoded size of the split for
scale. The point is that none of these grows with N: the stream holds a bounded number of blocks, never the
epoch.

    python benchmarks/stream_scale.py --data /tmp/syn1m     # made by benchmarks/prepare_scale.py
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.datasets.contract import read_meta  # noqa: E402
from metacorrect.datasets.stream import decoded_bytes, open_split  # noqa: E402
from metacorrect.platform.memory import PeakRSS, consume_shard  # noqa: E402


def object_store_peak(stop: threading.Event, out: list[float]) -> None:
    """Peak object-store bytes in use on this node, sampled every 0.5 s."""
    import ray

    while not stop.wait(0.5):
        try:
            total = ray.cluster_resources().get("object_store_memory", 0)
            free = ray.available_resources().get("object_store_memory", total)
            out.append(total - free)
        except Exception:  # noqa: BLE001 - a missed sample is not an error
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data set directory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    import ray

    meta = read_meta(args.data)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=0.5)
    class Worker:
        def consume(self, shard, batch_size: int) -> dict[str, float]:
            return consume_shard(shard, batch_size, trace_every=200)

    workers = [Worker.remote() for _ in range(args.workers)]
    stop, store = threading.Event(), []
    sampler = threading.Thread(target=object_store_peak, args=(stop, store), daemon=True)
    started = time.perf_counter()
    with PeakRSS() as driver:
        sampler.start()
        shards = open_split(args.data, "noisy_train", meta, shuffle_files=True).streaming_split(args.workers,
                                                                                                equal=False)
        results = ray.get([w.consume.remote(s, args.batch_size) for w, s in zip(workers, shards)])
        stop.set()
    seconds = time.perf_counter() - started
    rows = meta.counts["noisy_train"]
    assert sum(r["rows"] for r in results) == rows, "every row reaches exactly one worker"

    print(f"\n{rows} noisy images {'x'.join(map(str, meta.image_shape))} {meta.encoding}, "
          f"{decoded_bytes(meta, 'noisy_train') / 2**20:.0f} MiB decoded; {args.workers} workers, "
          f"batch {args.batch_size}; {seconds:.0f} s ({rows / seconds:.0f} images/s)\n")
    print("| process | rows | RSS growth MiB (after batch 20) | private (RssAnon) growth MiB | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| worker {i} | {r['rows']} | {r['growth_mb']:.0f} | {r['private_growth_mb']:.0f} | {r['peak_mb']:.0f} |")
    print(f"| driver | - | {driver.growth_mb:.0f} | - | {driver.peak_mb:.0f} |")
    for i, r in enumerate(results):
        print(f"worker {i} MiB by rows streamed (RSS / private): "
              + ", ".join(f"{n // 1000}k {mb:.0f}/{anon:.0f}" for n, mb, anon in r["trace"]))
    print(f"\nobject store in use: peak {max(store, default=0) / 2**20:.0f} MiB "
          f"(of {ray.cluster_resources().get('object_store_memory', 0) / 2**30:.1f} GiB)")
    ray.shutdown()


if __name__ == "__main__":
    main()
