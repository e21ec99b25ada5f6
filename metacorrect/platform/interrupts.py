"""Ctrl-C and SIGTERM held back while the driver talks to MLflow.

A `KeyboardInterrupt` raised in the middle of a SQLAlchemy session (MLflow's SQLite and database stores) leaves
that session's transaction open on a connection the traceback keeps alive: the store stays locked, and closing
the run as KILLED then fails with "database is locked", leaving the run RUNNING. In local mode the loop logs
from the main thread, so a Ctrl-C lands inside an MLflow call often. Signals reach Python only in the main
thread, and an MLflow call takes milliseconds (an artifact upload to a remote server longer): holding them back
for its duration is not something a user notices.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held back; one that arrived meanwhile is raised again at its end,
    to the handler that was in place before (so Ctrl-C still raises `KeyboardInterrupt`, SIGTERM still ends the
    run as it would have). A no-op outside the main thread and inside another `deferred` block."""
    if threading.current_thread() is not threading.main_thread() or \
            getattr(signal.getsignal(signal.SIGINT), "_holds_signals", False):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    hold._holds_signals = True  # type: ignore[attr-defined]
    previous = {sig: signal.signal(sig, hold) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


class UninterruptedClient:
    """An `MlflowClient` whose every call runs inside `deferred()`."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with deferred():
                return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """SIGINT's and SIGTERM's handlers as they were before the block, after it. Ray Tune's `fit` installs a
    Ctrl-C handler of its own and leaves it in place when the search ends: the caller's next Ctrl-C (in a
    notebook, a script that goes on) would only log "ending Ray Tune run" and be lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, left as it is
                signal.signal(sig, handler)
