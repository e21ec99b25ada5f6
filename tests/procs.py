"""Killing a real subprocess at a chosen point (interrupted prepares must leave nothing that looks complete)."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it exited first (or `ready` never held in time).

    The process is never left running: on any way out it is killed and reaped."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
