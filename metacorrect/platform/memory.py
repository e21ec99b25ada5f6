"""Resident memory of processes, read from /proc (Linux), for memory tests and benchmarks."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (0 if it has gone)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def private_bytes(pid: int | None = None) -> int:
    """Resident anonymous memory of a process (RssAnon): its own heap, without the file and shared pages
    that RSS also counts (Ray's object store is a shared mapping: a consumer reading its blocks in place
    shows them in RSS although they are the store's). 0 if gone."""
    return _proc_kib(pid, "status", "RssAnon:") * 1024


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size: resident pages with each shared page split among the processes mapping it,
    so a sum over processes that share memory (Ray's object store) counts it once. 0 if gone."""
    return _proc_kib(pid, "smaps_rollup", "Pss:") * 1024


def _proc_kib(pid: int | None, name: str, key: str) -> int:
    """The `key: N kB` line of /proc/PID/NAME (0 if the process has gone or the line is missing)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
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


def consume_shard(shard, batch_size: int, settle_batches: int = 20, trace_every: int = 0) -> dict[str, Any]:
    """Iterate a Ray Data shard as a training worker does (torch batches) and watch this process's memory.

    Growth is measured from batch `settle_batches` on: torch's import and the iterator's set-up are a fixed
    cost; what must not happen is growth with the rows streamed after that. Returns rows, the sum of the ids
    (to check every row arrived once), growth and peak of RSS and growth of private memory (RssAnon) in MiB,
    seconds, and with `trace_every` the (rows, RSS MiB, private MiB) seen every that many batches (to tell a
    plateau from growth with the rows)."""
    import numpy as np

    rows, id_sum, watches, trace = 0, 0.0, None, []
    started = time.perf_counter()
    for step, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, device="cpu")):
        if step == settle_batches:
            watches = _watch_memory()
        if trace_every and step % trace_every == 0:
            trace.append((rows, rss_bytes() / 2**20, private_bytes() / 2**20))
        rows += len(batch["id"])
        id_sum += float(np.asarray(batch["id"]).sum())
    rss, private = watches or _watch_memory()
    rss.__exit__(None, None, None)
    private.__exit__(None, None, None)
    return {"rows": rows, "id_sum": id_sum, "growth_mb": rss.growth_mb, "peak_mb": rss.peak_mb,
            "private_growth_mb": private.growth_mb, "seconds": time.perf_counter() - started, "trace": trace}


def _watch_memory() -> tuple[PeakRSS, PeakRSS]:
    return PeakRSS().__enter__(), PeakRSS(per_process=private_bytes).__enter__()
