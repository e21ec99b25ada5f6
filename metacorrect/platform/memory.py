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
    """Peak total RSS of `pids()` (default: this process) above its level at start, sampled every 20 ms."""

    def __init__(self, pids: Callable[[], list[int]] | None = None, interval: float = 0.02):
        self.pids = pids or (lambda: [os.getpid()])
        self.interval = interval
        self.start = self.peak = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())

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
