"""The console of a run shows the project's own lines, its results and real warnings: none of Ray's or MLflow's
routine notices. A real `metacorrect run` on two Ray Train workers, in a process of its own on a cluster of its
own with the project's defaults (not the test session's Ray settings)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from procs import ROOT

pytestmark = pytest.mark.slow

# What each routine notice looks like, and where it came from before the project quieted it.
ROUTINE = {
    "an error-level line of Ray's C++ core (the preemption watcher's)": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]"),
    "a deprecation warning (Ray's own DataConfig defaults)": re.compile(r"DeprecationWarning"),
    "a FutureWarning (torch scripting its JVP decompositions)": re.compile(r"FutureWarning"),
    "the source line Python prints under a warning": re.compile(r"^\s*(\(\w+ pid=\d+\)\s*)?\s*(warnings\.warn\(|self\.\w+ = )"),
    "Ray's token-authentication notice for a cluster of our own": re.compile(r"Token authentication is enabled"),
    "MLflow's database set-up notices": re.compile(r"INFO mlflow\."),
}


def _run(args: list[str], sets: list[str]) -> str:
    """`metacorrect run configs/digits_demo.yaml ARGS` in a process and on a Ray cluster of its own, with the
    project's Ray settings (not the test session's); its console, colours removed."""
    # RAY_AUTH_MODE too: the session's own cluster sets it in this process once it has started.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TRAIN_") and k != "RAY_AUTH_MODE"}
    env |= {"RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "metacorrect", "run", "configs/digits_demo.yaml", *args,
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray colours the worker prefixes
    assert proc.returncode == 0, output[-4000:]
    return output


def test_a_run_prints_its_own_lines_and_no_routine_notice(digits_noisy, tmp_path):
    # mlc: a meta method's first forward-mode AD makes torch import (and script) its JVP decompositions.
    output = _run([], [f"data.path={digits_noisy}", "train.epochs=1", "resources.num_workers=2", "model.width=8",
                       "method.name=mlc",
                       f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage_path={tmp_path / 'runs'}"])
    assert "[metacorrect] starting run" in output and "[metacorrect] epoch 1/1" in output
    assert "test@best val" in output and "MLflow runs:" in output, "the results and where they are"
    for what, pattern in ROUTINE.items():
        hits = [line for line in output.splitlines() if pattern.search(line)]
        assert not hits, f"{what}: {hits[:3]}"


def test_verbose_keeps_ray_and_mlflow_notices(digits_noisy, tmp_path):
    output = _run(["--verbose"], [f"data.path={digits_noisy}", "train.epochs=1", "resources.num_workers=0",
                                  "model.width=8", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                  f"tracking.storage_path={tmp_path / 'runs'}"])
    assert ROUTINE["Ray's token-authentication notice for a cluster of our own"].search(output), output[-3000:]
    assert ROUTINE["MLflow's database set-up notices"].search(output), output[-3000:]
    assert "[metacorrect] epoch 1/1" in output
