"""The test suite on this box and on a box N times slower, simulated by a CPU quota (Linux cgroups, as root).

A box N times slower runs the same work in N times the CPU time. A cgroup quota of (cores / N) CPUs gives the
suite's processes that much CPU in all, so a suite that keeps every core busy takes about N times as long, as
it would on the slower box. A lone busy thread is slowed less (it may use up to the whole quota), so where the
suite leaves cores idle the figure is a little optimistic. What the quota does not hide: work that grows with
wall time (Ray's periodic reports, health checks and polls in each of its processes) costs more on the slower
box, as it would there. Printed in one run:

  run       this box as it is, then inside the quota
  wall      the suite's wall time
  busy      core-seconds the machine's CPUs were busy meanwhile (/proc/stat; run it on an otherwise idle box)
  ratio     wall over this box's wall

    sudo python benchmarks/suite_on_a_slower_box.py                      # the whole suite, 2.4x slower
    sudo python benchmarks/suite_on_a_slower_box.py --slowdown 3 --pytest-args "-q tests/test_faults.py"
    sudo python benchmarks/suite_on_a_slower_box.py --no-baseline        # only the slowed run
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERIOD_US = 100_000
NAME = f"metacorrect-slower-box-{os.getpid()}"


def _busy_core_s() -> float:
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def make_cgroup(cpus: float) -> tuple[Path, Path]:
    """A cgroup limited to `cpus` CPUs: (its directory, the file a pid is written to to join it). cgroup v2
    where the cpu controller is there, else v1's cpu hierarchy."""
    quota = max(1000, int(cpus * PERIOD_US))
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    v2 = controllers.is_file() and "cpu" in controllers.read_text().split()
    group = (controllers.parent if v2 else Path("/sys/fs/cgroup/cpu")) / NAME
    group.mkdir()
    try:
        if v2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
    except OSError:
        group.rmdir()
        raise
    return group, group / "cgroup.procs"


def run_suite(pytest_args: list[str], procs_file: Path | None) -> tuple[float, float, str]:
    """(wall s, busy core-s, pytest's last line) of one suite run, inside the cgroup of `procs_file` if any."""
    def join() -> None:  # in the child, before pytest starts: every process it starts stays in the group
        procs_file.write_text(str(os.getpid()))

    busy, start = _busy_core_s(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=join if procs_file else None)
    wall, busy = time.monotonic() - start, _busy_core_s() - busy
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return wall, busy, (lines[-1] if lines else f"exit {done.returncode}: {done.stderr[-300:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slowdown", type=float, default=2.4, help="how many times slower the simulated box is")
    parser.add_argument("--cores", type=float, default=os.cpu_count(), help="this box's cores (default: all)")
    parser.add_argument("--pytest-args", default="-q -p no:cacheprovider", help="what pytest is given")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on this box as it is")
    args = parser.parse_args(argv)
    if args.slowdown < 1:
        print(f"error: --slowdown {args.slowdown}: expected 1 or more", file=sys.stderr)
        return 2
    try:
        group, procs_file = make_cgroup(args.cores / args.slowdown)
    except OSError as err:
        print(f"error: cannot make a CPU-limited cgroup ({err}); this needs Linux cgroups and root", file=sys.stderr)
        return 2
    pytest_args = shlex.split(args.pytest_args)
    rows = []
    try:
        if not args.no_baseline:
            print("the suite on this box as it is ...", flush=True)
            rows.append(("this box", *run_suite(pytest_args, None)))
            print(f"this box: {rows[-1][1]:.0f} s, {rows[-1][3]}", flush=True)
        cpus = args.cores / args.slowdown
        print(f"the suite with {cpus:.3f} CPUs in all ({args.slowdown:g}x slower) ...", flush=True)
        rows.append((f"{args.slowdown:g}x slower", *run_suite(pytest_args, procs_file)))
    finally:
        deadline = time.monotonic() + 60  # Ray's processes end a few seconds after the suite's last test
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(1)
        try:
            group.rmdir()
        except OSError as err:
            print(f"warning: {group} left behind ({err}): a process of the suite is still in it", file=sys.stderr)
    base = rows[0][1] if not args.no_baseline else None
    print(f"\n{'run':>14} {'wall':>7} {'busy':>11} {'ratio':>6}  result")
    for name, wall, busy, result in rows:
        ratio = f"{wall / base:6.2f}" if base else "     -"
        print(f"{name:>14} {int(wall // 60):4d}:{int(wall % 60):02d} {busy:7.0f} c-s {ratio}  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
