"""Resident memory of processes, read from /proc (Linux), for memory tests and benchmarks."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (0 if it has gone)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size: resident pages with each shared page split among the processes mapping it,
    so a sum over processes that share memory (Ray's object store) counts it once. 0 if gone."""
    try:
        with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return 0


def descendants(pid: int | None = None) -> list[int]:
    """Child processes, recursively (DataLoader workers and the like)."""
    out, todo = [], [pid or os.getpid()]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except FileNotFoundError:
            kids = []
        out += kids
        todo += kids
    return out


class PeakRSS:
    """Peak total RSS of `pids()` (default: this process) above its level at start, sampled every 20 ms.

    `per_process` measures one process (default `rss_bytes`; `pss_bytes` for processes sharing memory).
    """

    def __init__(self, pids: Callable[[], list[int]] | None = None, interval: float = 0.02,
                 per_process: Callable[[int], int] = rss_bytes):
        self.pids = pids or (lambda: [os.getpid()])
        self.per_process = per_process
        self.interval = interval
        self.start = self.peak = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        return sum(self.per_process(p) for p in self.pids())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._total())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
