"""Wall time and peak memory of a synthetic prepare at scale (the numbers in docs/benchmarks.md).

Runs `metacorrect data prepare synthetic --n N --classes C --image-size S` as a child process and samples,
every 0.2 s, the RSS of its largest process and the PSS summed over it and every process it started (the
local Ray instance included: raylet, GCS, workers; PSS counts shared object-store pages once), and the CPU
seconds all of them used: on a box shared with other jobs, wall time says little, CPU time / cores says what
an idle box would take.

    python benchmarks/prepare_scale.py --n 200000 --out /tmp/syn200k
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.platform.memory import descendants, pss_bytes, rss_bytes  # noqa: E402


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "metacorrect", "data", "prepare", "synthetic", "--n", str(args.n), "--classes",
           str(args.classes), "--image-size", str(args.image_size), "--out", args.out, "--noise", "symmetric:0.4",
           "--overwrite", *(["--workers", str(args.workers)] if args.workers else [])]
    started = time.time()
    proc = subprocess.Popen(cmd)
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}  # last seen CPU time of every process of the prepare
    while proc.poll() is None:
        pids = [proc.pid, *descendants(proc.pid)]
        cpu.update({p: max(cpu.get(p, 0.0), cpu_seconds(p)) for p in pids})
        peak_rss = max(peak_rss, max(rss_bytes(p) for p in pids))
        peak_pss = max(peak_pss, sum(pss_bytes(p) for p in pids))
        time.sleep(0.2)
    wall = time.time() - started
    if proc.returncode:
        sys.exit(f"prepare failed (exit {proc.returncode})")
    cpu_s = sum(cpu.values())
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| images | wall s | images/s | CPU s (all processes) | CPU s / CPUs | peak RSS of one process MiB | "
          "peak PSS all processes MiB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.n} | {wall:.0f} | {args.n / wall:.0f} | {cpu_s:.0f} | {cpu_s / os.cpu_count():.0f} | "
          f"{peak_rss / 2**20:.0f} | {peak_pss / 2**20:.0f} |")


if __name__ == "__main__":
    main()
