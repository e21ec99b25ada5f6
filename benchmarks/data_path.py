"""Data path benchmark: the Ray Data stream vs a torch DataLoader over the same parquet shards.

Both paths read the same files, decode JPEG in W parallel workers (Ray Data tasks / DataLoader worker
processes), and hand uint8 batches to the consumer, which applies the same augmentation and
normalisation (`augment_images`, `to_model_input`, as the training loop does). Printed in one run:

  samples/s   of each path, consumer doing nothing but the transforms: over the whole epoch (pipeline
              start included, as a training epoch pays it) and over the epoch's second half (steady
              state, what a long Clothing1M epoch sees), and the time to the first batch
  ratio       Ray / DataLoader of both (goal >= 1.0)
  peak memory of each path's own processes: each path runs in a fresh subprocess (the DataLoader one never
              starts Ray; the Ray one starts a dedicated local Ray instance, so another cluster on the
              machine is not counted). RSS of the driver + its worker processes (Ray `ray::` workers or
              DataLoader workers), and PSS of every process of the path (Ray's raylet, GCS, object store
              included), which counts shared pages once instead of once per process that maps them.
  wait        fraction of a training step spent waiting for the next batch, training a small CNN

    python benchmarks/data_path.py                         # synthetic 64x64 JPEG, 60k images, 2 workers
    python benchmarks/data_path.py --data DIR --workers 4  # any prepared data set
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.datasets.codec import decode_images  # noqa: E402
from metacorrect.datasets.contract import read_meta, split_files  # noqa: E402
from metacorrect.datasets.prepare import prepare  # noqa: E402
from metacorrect.datasets.stream import augment_images, open_split, to_model_input  # noqa: E402
from metacorrect.methods.backbones import build_backbone  # noqa: E402
from metacorrect.platform.memory import PeakRSS, descendants, pss_bytes  # noqa: E402


class ParquetBatches(torch.utils.data.IterableDataset):
    """The DataLoader side: row groups of the shards dealt to workers, decoded to uint8 batches."""

    def __init__(self, files: list[str], encoding: str, shape: tuple[int, int, int], batch_size: int):
        self.files, self.encoding, self.shape, self.batch_size = files, encoding, shape, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        units = [(f, g) for f in self.files for g in range(pq.ParquetFile(f).num_row_groups)]
        for f, g in units[worker::workers]:
            table = pq.ParquetFile(f).read_row_group(g, columns=["id", "image", "label"])
            for lo in range(0, table.num_rows, self.batch_size):
                part = table.slice(lo, self.batch_size)
                yield {"id": torch.from_numpy(part["id"].to_numpy()),
                       "image": torch.from_numpy(decode_images(part["image"].to_pylist(), self.encoding, self.shape)),
                       "label": torch.from_numpy(part["label"].to_numpy().astype(np.int64))}


def ray_batches(directory: Path, workers: int, batch_size: int):
    meta = read_meta(directory)
    ds = open_split(directory, "noisy_train", meta, shuffle_files=True, decode_concurrency=workers)
    return ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2)


def torch_batches(directory: Path, workers: int, batch_size: int):
    meta = read_meta(directory)
    dataset = ParquetBatches(split_files(directory, "noisy_train"), meta.encoding, tuple(meta.image_shape), batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2,
                                       persistent_workers=False)


def worker_pids() -> list[int]:
    """This driver + its worker processes: the DataLoader's (forked, same command line) or the Ray workers
    (`ray::...`) of the Ray instance this process started; Ray's own daemons are left out."""
    with open("/proc/self/cmdline", "rb") as f:
        own = f.read()
    pids = [os.getpid()]
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::") or cmd == own:
            pids.append(pid)
    return pids


def all_pids() -> list[int]:
    """This driver and every process it started (for Ray: raylet, GCS, dashboard agent, workers...)."""
    return [os.getpid(), *descendants()]


def measure(make, directory: Path, workers: int, batch_size: int, augment: str, mean, std,
            model: torch.nn.Module | None = None, max_steps: int | None = None) -> dict[str, float]:
    """One pass: samples/s with the consumer applying the transforms (and training `model` if given)."""
    rows, wait, compute, steps = 0, 0.0, 0.0, 0
    arrivals: list[tuple[float, int]] = []  # (time the batch arrived, rows) for the steady-state rate
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
    with PeakRSS(worker_pids) as rss, PeakRSS(all_pids, interval=0.1, per_process=pss_bytes) as pss:
        started = time.perf_counter()
        it = iter(make(directory, workers, batch_size))
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            arrivals.append((t1 - started, len(batch["id"])))
            x = to_model_input(augment_images(batch["image"], augment), mean, std)
            if model is not None:
                loss = torch.nn.functional.cross_entropy(model(x), batch["label"].long())
                opt.zero_grad()
                loss.backward()
                opt.step()
            t2 = time.perf_counter()
            if steps:  # the first batch includes the pipeline start-up for both paths alike
                wait += t1 - t0
                compute += t2 - t1
            rows += len(batch["id"])
            steps += 1
            if max_steps and steps >= max_steps:
                break
        elapsed = time.perf_counter() - started
        del it
    half = arrivals[len(arrivals) // 2:]  # second half of the epoch's batches
    steady = sum(n for _, n in half[1:]) / max(half[-1][0] - half[0][0], 1e-9) if len(half) > 1 else 0.0
    return {"samples_s": rows / elapsed, "steady_s": steady, "first_s": arrivals[0][0] if arrivals else 0.0,
            "rss_mb": rss.peak_mb, "pss_mb": pss.peak_mb,
            "wait": wait / max(wait + compute, 1e-9), "rows": rows, "seconds": elapsed}


def run_path(name: str, args: argparse.Namespace) -> dict[str, float]:
    """The measurements of one path, in this (fresh) process."""
    directory = Path(args.data)
    meta = read_meta(directory)
    torch.set_num_threads(1)
    if name == "ray_data":
        import ray

        # A dedicated instance (address="local"), sized like the DataLoader's pool plus the consumer.
        for attempt in range(3):  # Ray's 30 s node start-up limit can pass on a box loaded by other jobs
            try:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().print_on_execution_start = False
    make = {"ray_data": ray_batches, "torch_dataloader": torch_batches}[name]
    mean, std = torch.tensor(meta.pixel_mean), torch.tensor(meta.pixel_std)
    common = dict(directory=directory, workers=args.workers, batch_size=args.batch_size, augment=args.augment,
                  mean=mean, std=std)
    # Warm-up, a whole pass: imports, worker processes, page cache. (A pass cut short leaves Ray's worker
    # pool half started, and the measured pass would pay for the rest.)
    measure(make, **common)
    result = measure(make, **common)
    model = build_backbone("small_cnn", meta.num_classes, meta.image_shape, width=16)
    result["train_wait"] = measure(make, model=model, max_steps=args.train_steps, **common)["wait"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared data set (default: synthetic JPEGs prepared in a temp dir)")
    parser.add_argument("--n", type=int, default=60000, help="synthetic images (default 60000)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decode workers of both paths (default 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--augment", default="crop_flip")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the small-CNN wait measurement")
    parser.add_argument("--repeats", type=int, default=2,
                        help="fresh runs of each path, alternating (default 2); the table shows the best")
    parser.add_argument("--path", choices=["ray_data", "torch_dataloader"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:  # a child measuring one path
        print("RESULT " + json.dumps(run_path(args.path, args)), flush=True)
        return

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="data-path-")
        args.data = str(Path(tmp.name) / "syn")
        prepare("synthetic", args.data, options={"n": args.n, "num_classes": 14, "image_size": args.image_size,
                                                 "encoding": "jpeg"}, clean_per_class=10, val_per_class=10,
                progress=False)
    meta = read_meta(args.data)
    runs: dict[str, list[dict[str, float]]] = {"ray_data": [], "torch_dataloader": []}
    for _ in range(args.repeats):
        for name in ("torch_dataloader", "ray_data"):
            runs[name].append(_child(name, args))
    results = {name: max(rs, key=lambda r: r["samples_s"]) for name, rs in runs.items()}
    torch_r = results["torch_dataloader"]
    files = len(split_files(args.data, "noisy_train"))
    print(f"\ndata path: {meta.counts['noisy_train']} images {'x'.join(map(str, meta.image_shape))} {meta.encoding} "
          f"in {files} file(s), {args.workers} decode workers, batch {args.batch_size}, augment {args.augment}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; best of {args.repeats} fresh "
          f"runs per path (all: " + "; ".join(f"{n} " + ", ".join(f"{r['samples_s']:.0f}" for r in rs)
                                             for n, rs in runs.items()) + " samples/s)\n")
    print("| path | epoch samples/s | × DataLoader | steady samples/s (2nd half) | × DataLoader | first batch s | "
          "peak RSS MiB (driver + workers) | peak PSS MiB (all processes) | train step waiting for data |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_s']:.0f} | {r['samples_s'] / torch_r['samples_s']:.2f}× | {r['steady_s']:.0f} | "
              f"{r['steady_s'] / torch_r['steady_s']:.2f}× | {r['first_s']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['pss_mb']:.0f} | {100 * r['train_wait']:.1f}% |")
    for what, key in (("epoch", "samples_s"), ("steady state", "steady_s")):
        ratio = results["ray_data"][key] / torch_r[key]
        print(f"goal Ray Data / DataLoader >= 1.0 ({what}): {'met' if ratio >= 1.0 else 'missed'} ({ratio:.2f})")
    if tmp is not None:
        tmp.cleanup()


def _child(name: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, __file__, "--path", name, "--data", args.data, "--workers", str(args.workers),
            "--batch-size", str(args.batch_size), "--augment", args.augment, "--train-steps", str(args.train_steps)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{name} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    main()
