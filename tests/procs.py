"""Real subprocesses for fault tests: started in sessions of their own, killed at a chosen point, their whole
process group ended after (only processes the tests started)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def set_args(values: list[str]) -> list[str]:
    """`--set` before each FIELD=VALUE, as the CLI takes them."""
    return [arg for v in values for arg in ("--set", v)]


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


def start_cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m metacorrect ARGS` in a session of its own (so its process group can be ended), on a Ray
    cluster of its own (RAY_ADDRESS=local), output to `log`."""
    env = os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)} | (env or {})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "metacorrect", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `ready` every 10 ms; fail if `proc` exits first or `timeout` passes."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


def start_and_signal(args: list[str], log: Path, env: dict[str, str], sig: int, ready: Callable[[], bool]) -> int:
    """`metacorrect ARGS` started as `start_cli` does (`env` added), `sig` sent to it once `ready()` holds; its exit
    status. Whatever of it survives the signal is ended after (its Ray workers end with it)."""
    driver = start_cli(args, log, env)
    try:
        wait_until(ready, driver, 240, f"the moment to send signal {sig}")
        driver.send_signal(sig)
        return driver.wait(timeout=120)
    finally:
        stop_group(driver.pid)


def stop_group(pgid: int) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left of it."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def kill_cli_after_line(args: list[str], gcs_address: str, marker: Callable[[str], str | None],
                        timeout: float = 300, sig: int = signal.SIGKILL) -> tuple[str, int, str]:
    """`python -m metacorrect ARGS` on the session's cluster (`gcs_address`), its output read line by line;
    when `marker(line)` returns a value, `sig` goes to the driver's whole process group: SIGKILL as on a crash,
    SIGINT as Ctrl-C in a terminal (the driver is then given 120 s to wind down). Returns (the value, the exit
    status, the output after the signal). Fails, printing the last lines, if no line matches in `timeout` s."""
    env = os.environ | {"RAY_ADDRESS": gcs_address, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "metacorrect", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    found, lines, rest = None, [], ""
    try:
        deadline = time.time() + timeout
        for line in driver.stdout:
            lines.append(line)
            found = marker(line)
            if found:
                break
            assert time.time() < deadline, "no line matched in time:\n" + "".join(lines[-30:])
        if found:
            os.killpg(driver.pid, sig)
            if sig != signal.SIGKILL:
                rest, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert found, "".join(lines[-30:])
    return found, driver.returncode, rest


def run_own_cluster(args: list[str], sets: list[str]) -> str:
    """`metacorrect run configs/digits_demo.yaml ARGS --set SETS...` as a user starts it: in a process and on a Ray
    cluster of its own, with the project's Ray settings (not the test session's Ray Train timings); fails unless
    it exits 0. Returns its console, colours removed."""
    import re

    # RAY_AUTH_MODE too: the session's own cluster sets it in this process once it has started; and conftest's
    # settings for the suite's clusters (the log monitor's, usage reports), so that a notice they hide shows here.
    suite_only = {"RAY_AUTH_MODE", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "RAY_USAGE_STATS_ENABLED"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TRAIN_") and k not in suite_only}
    env |= {"RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "metacorrect", "run", "configs/digits_demo.yaml", *args,
                           *set_args(sets)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray colours the worker prefixes
    assert proc.returncode == 0, output[-4000:]
    return output
