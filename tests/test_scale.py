"""Memory stays bounded at scale: a 200,000-image synthetic prepare and one epoch streamed to 2 workers.

The images are 16x16x3 raw (768 B each, 154 MB in all), so a prepare or a stream that held the data set
would exceed the bounds asserted here; a bounded one stays far below them. Memory only, no timings.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

from metacorrect.datasets.contract import read_meta
from metacorrect.datasets.prepare import prepare
from metacorrect.datasets.stream import open_split
from metacorrect.platform.memory import PeakRSS, consume_shard

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 200_000
IMAGE = 16
DATA_MB = N * IMAGE * IMAGE * 3 / 2**20  # 146 MiB of pixels
BOUND_MB = 100  # growth allowed to any one process: well below the data set


@ray.remote(num_cpus=0.5)
class Consumer:
    """A training worker's side of the stream."""

    def consume(self, shard, batch_size: int) -> dict[str, float]:
        return consume_shard(shard, batch_size)


@pytest.mark.slow
def test_200k_prepare_and_streamed_epoch_stay_bounded(tmp_path: Path, ray_cluster) -> None:
    out = tmp_path / "syn200k"
    with PeakRSS() as driver_prepare:
        meta = prepare("synthetic", out, options={"n": N, "num_classes": 14, "image_size": IMAGE},
                       noise="symmetric:0.4", clean_per_class=50, val_per_class=50, progress=False)
    assert meta.encoding == "raw" and sum(meta.counts.values()) == N
    assert driver_prepare.growth_mb < BOUND_MB < DATA_MB, driver_prepare.growth_mb

    rows = meta.counts["noisy_train"]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    consumers = [Consumer.remote() for _ in range(2)]
    with PeakRSS() as driver_stream:
        shards = open_split(out, "noisy_train", read_meta(out), shuffle_files=True).streaming_split(2, equal=False)
        results = ray.get([c.consume.remote(s, 256) for c, s in zip(consumers, shards)])
    for c in consumers:
        ray.kill(c)
    # Every row reaches exactly one worker, and no process held the epoch.
    assert sum(r["rows"] for r in results) == rows
    assert sum(r["id_sum"] for r in results) == rows * (rows - 1) / 2
    assert driver_stream.growth_mb < BOUND_MB, driver_stream.growth_mb
    for r in results:
        assert r["growth_mb"] < BOUND_MB, results
        assert r["private_growth_mb"] < BOUND_MB, results
    print(f"\n200k: driver +{driver_prepare.growth_mb:.0f} MiB (prepare), +{driver_stream.growth_mb:.0f} MiB "
          f"(stream); workers +{results[0]['growth_mb']:.0f} / +{results[1]['growth_mb']:.0f} MiB after batch 20 "
          f"(peak {results[0]['peak_mb']:.0f} / {results[1]['peak_mb']:.0f} MiB; private +"
          f"{results[0]['private_growth_mb']:.0f} / +{results[1]['private_growth_mb']:.0f} MiB); "
          f"data {DATA_MB:.0f} MiB")
