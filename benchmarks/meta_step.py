"""Step time and peak memory of `mlc`, `emlc` (k = 1 and 5), `ieg`, `mwnet`, `l2rw` (fast vs exact meta-gradient)
relative to `erm`.

One process, the same student (same seed) and the same pre-generated random batches for every row.
Time: per-step time averaged over blocks of 5 steps (so k = 5 is amortised over its meta step), the median
over --steps blocks after --warmup blocks. Memory: GPU torch.cuda.max_memory_allocated above what was
allocated before the first step; CPU the peak resident set (sampled every millisecond) above the RSS
before the first step.

    python benchmarks/meta_step.py                                   # resnet18_cifar, 32x32x3, batch 64
    python benchmarks/meta_step.py --arch small_cnn --width 16 --steps 3 --device cpu
    python benchmarks/meta_step.py --precision fp32,bf16,fp16 --table-rows 0    # the same rows in each precision
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import sys
import threading
import time

import torch

from metacorrect.config import PRECISIONS, ExperimentConfig
from metacorrect.methods import METHODS, Batch, MethodContext
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform.collective import Collective
from metacorrect.platform.precision import step_precision

BLOCK = 5  # steps per timing block: a multiple of every k measured, so meta steps are amortised

ROWS = ([("erm", 1, "-")] + [(name, k, mode) for name in ("mlc", "emlc") for k in (1, 5) for mode in ("fast", "exact")]
        + [(name, 1, mode) for name in ("mslg", "soft_labels", "ieg", "mwnet", "l2rw") for mode in ("fast", "exact")])
EXTRA = {"mslg": {"warmup_epochs": 0}}  # time the label-learning steps, not the warm-up


class RSSPeak:
    """Peak resident set size of this process while active, sampled by a thread (CPU memory)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RSSPeak:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def trim_heap() -> None:
    """Give freed memory back to the OS between rows so each row's RSS baseline is honest (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_batches(args, device: torch.device, count: int) -> list[tuple[Batch, Batch]]:
    g = torch.Generator().manual_seed(0)
    shape = (args.channels, args.image, args.image)
    out = []
    for _ in range(count):
        # One strongly augmented view per noisy image (IEG's; the other methods ignore Batch.views).
        noisy = Batch(torch.arange(args.batch), torch.randn(args.batch, *shape, generator=g).to(device),
                      torch.randint(0, args.classes, (args.batch,), generator=g).to(device), float(args.batch),
                      views=torch.randn(1, args.batch, *shape, generator=g).to(device))
        clean = Batch(torch.arange(args.clean_batch), torch.randn(args.clean_batch, *shape, generator=g).to(device),
                      torch.randint(0, args.classes, (args.clean_batch,), generator=g).to(device),
                      float(args.clean_batch))
        out.append((noisy, clean))
    return out


def measure(args, name: str, k: int, mode: str, device: torch.device, data,
            precision: str = "fp32") -> tuple[float, float]:
    """(median per-step seconds, peak MiB above the start) of one method setting."""
    method_cfg = {"name": name} if name == "erm" else {"name": name, "meta_grad": mode} | EXTRA.get(name, {})
    if "k" in {f.name for f in dataclasses.fields(METHODS[name].config_class)}:
        method_cfg["k"] = k
    cfg = ExperimentConfig.from_dict({"method": method_cfg, "model": {"arch": args.arch, "width": args.width},
                                      "resources": {"num_workers": 1}, "train": {"precision": precision}})
    torch.manual_seed(0)
    model = build_backbone(args.arch, args.classes, (args.image, args.image, args.channels), args.width).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    method = METHODS[name](MethodContext(cfg, model, opt, args.classes, 10_000, Collective(device=device)))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = 0

    def block() -> float:
        nonlocal step
        sync()
        t0 = time.perf_counter()
        for _ in range(BLOCK):
            with step_precision(precision, device):
                method.step(*data[step % len(data)])
            step += 1
        sync()
        return (time.perf_counter() - t0) / BLOCK

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(args.warmup):
            block()
        times = [block() for _ in range(args.steps)]
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with RSSPeak() as rss:
            for _ in range(args.warmup):
                block()
            times = [block() for _ in range(args.steps)]
        peak = (rss.peak - rss.base) / 2**20
    if method.loss_scales.enabled:  # fp16: skipped steps are cheaper, so the time counts fewer full steps
        counts = {k: v for k, v in method.loss_scales.metrics().items() if "skipped" in k}
        print(f"  {name} k={k} {mode} fp16: {counts} over {step} steps", file=sys.stderr, flush=True)
    method = model = opt = None  # free them before the heap is trimmed
    if cuda:
        torch.cuda.empty_cache()
    trim_heap()
    return statistics.median(times), peak


def _table_worker(rank: int, init_file: str, rows: int, classes: int, batch: int, out_file: str) -> None:
    import datetime

    import torch.distributed as dist

    from metacorrect.methods.table import SampleTable, onehot_logits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        table = SampleTable("labels", rows, Collective(2, rank), num_classes=classes, init_row=onehot_logits(10.0))
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(25):
            ids = torch.randperm(rows, generator=g)[:batch]  # the same draw on both ranks: disjoint halves
            mine = ids[rank * batch // 2:(rank + 1) * batch // 2]
            labels = torch.randint(0, classes, (len(mine),), generator=g)
            new_rows = table.read(mine, labels) + 0.5
            dist.barrier()
            t0 = time.perf_counter()
            table.write(mine, new_rows, labels)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(statistics.median(times[5:]), out_file)
    finally:
        dist.destroy_process_group()


def label_table_update_seconds(rows: int, classes: int, batch: int) -> float:
    """Median time of one `SampleTable.write` (all-gather + in-place write) with 2 gloo workers."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_table_worker, args=(r, f"{tmp}/pg", rows, classes, batch, f"{tmp}/t.pt"))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=300)
        if any(proc.exitcode != 0 for proc in procs):
            sys.exit("meta_step: the label-table timing workers failed")
        return float(torch.load(f"{tmp}/t.pt"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--width", type=int, default=32, help="width of small_cnn / mlp (ResNets ignore it)")
    p.add_argument("--image", type=int, default=32, help="image side")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="noisy rows per step")
    p.add_argument("--clean-batch", type=int, default=None, help="clean rows per step (default: batch / 2)")
    p.add_argument("--steps", type=int, default=5, help=f"timed blocks of {BLOCK} steps")
    p.add_argument("--warmup", type=int, default=1, help=f"untimed blocks of {BLOCK} steps")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--only", default=None, help="comma-separated methods to run besides erm, e.g. emlc,ieg")
    p.add_argument("--table-rows", type=int, default=1_000_000,
                   help="rows of the label-table update timing (0: skip it)")
    p.add_argument("--classes-table", type=int, default=14, help="classes of the label-table timing (Clothing1M: 14)")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated train.precision values to time every row in (fp32, bf16, fp16)")
    args = p.parse_args(argv)
    precisions = args.precision.split(",")
    if not set(precisions) <= set(PRECISIONS):
        sys.exit(f"meta_step: --precision: expected some of {', '.join(PRECISIONS)}, got {args.precision}")
    args.clean_batch = args.clean_batch or max(2, args.batch // 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("meta_step: --device cuda but no CUDA device is available")
    data = make_batches(args, device, 2 * BLOCK)
    rows = [r for r in ROWS if r[0] == "erm" or args.only is None or r[0] in args.only.split(",")]

    what = f"{args.arch}" + (f" width {args.width}" if args.arch in ("small_cnn", "mlp") else "")
    print(f"# {what}, {args.image}x{args.image}x{args.channels}, {args.classes} classes, batch {args.batch} noisy + "
          f"{args.clean_batch} clean, {device.type}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)")
          + f", torch {torch.__version__}; median of {args.steps} blocks of {BLOCK} steps after {args.warmup}")
    results: dict[tuple[str, int, str, str], tuple[float, float]] = {}
    for precision in precisions:
        for name, k, mode in rows:
            results[name, k, mode, precision] = measure(args, name, k, mode, device, data, precision)
            print(f"  measured {name:5s} k={k} {mode:5s} {precision}: "
                  f"{results[name, k, mode, precision][0] * 1e3:9.1f} ms/step", file=sys.stderr, flush=True)
    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| method | k | meta_grad | precision | ms / step | × erm | exact / fast | × fp32 | {mem} | × erm mem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, k, mode, precision), (t, m) in results.items():
        erm_t, erm_m = results["erm", 1, "-", precision]
        speed = ""
        if mode == "fast" and (name, k, "exact", precision) in results:
            speed = f"{results[name, k, 'exact', precision][0] / t:.2f}×"
        vs_fp32 = f"{t / results[name, k, mode, 'fp32'][0]:.2f}×" \
            if precision != "fp32" and (name, k, mode, "fp32") in results else ""
        ratio_m = f"{m / erm_m:.2f}×" if erm_m > 0.5 else "-"
        has_k = name != "erm" and "k" in {f.name for f in dataclasses.fields(METHODS[name].config_class)}
        shown_k = k if has_k else "-"
        print(f"| {name} | {shown_k} | {mode} | {precision} | {t * 1e3:.1f} | {t / erm_t:.2f}× | {speed} | {vs_fp32} "
              f"| {m:.0f} | {ratio_m} |")
    first = precisions[0]
    results = {(n, k, mode): v for (n, k, mode, p), v in results.items() if p == first}  # the checks: one precision
    erm_t = results["erm", 1, "-"][0]
    checks = []
    if ("emlc", 1, "fast") in results:
        checks.append(("EMLC k=1 fast ≤ 2.8× ERM", results["emlc", 1, "fast"][0] / erm_t, lambda r: r <= 2.8))
    if ("emlc", 5, "fast") in results:
        checks.append(("EMLC k=5 fast (amortised) ≤ 1.8× ERM", results["emlc", 5, "fast"][0] / erm_t,
                       lambda r: r <= 1.8))
    for name, k, mode in results:
        if mode == "fast" and (name, k, "exact") in results:
            checks.append((f"{name.upper()} k={k}: fast ≥ 1.5× faster than exact",
                           results[name, k, "exact"][0] / results[name, k, "fast"][0], lambda r: r >= 1.5))
    if args.table_rows:
        update = label_table_update_seconds(args.table_rows, args.classes_table, 1024)
        print(f"\nlabel_table: one all-gathered update of 1024 rows in a {args.table_rows:,} x {args.classes_table} "
              f"table, 2 workers (gloo, CPU): {update * 1e3:.2f} ms = {update / erm_t:.3f}× an erm step")
    print()
    for label, ratio, ok in checks:
        print(f"{'PASS' if ok(ratio) else 'MISS'}  {label}: {ratio:.2f}×")


if __name__ == "__main__":
    main()
