"""The console of a run shows the project's own lines, its results and real warnings: none of Ray's or MLflow's
routine notices. A real `metacorrect run` on two Ray Train workers with its noisy split streamed (conftest's
`cli_run_two_workers_streamed`), in a process of its own on a cluster of its own with the project's defaults
(not the test session's Ray settings)."""
from __future__ import annotations

import re

import pytest

from procs import run_own_cluster

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


def test_a_run_prints_its_own_lines_and_no_routine_notice(cli_run_two_workers_streamed):
    # mlc: a meta method's first forward-mode AD makes torch import (and script) its JVP decompositions;
    # streamed: Ray Data's executions start in the workers, each epoch
    output, _ = cli_run_two_workers_streamed
    assert "[metacorrect] starting run" in output and "[metacorrect] epoch 2/2" in output
    assert "test@best val" in output and "MLflow runs:" in output, "the results and where they are"
    for what, pattern in ROUTINE.items():
        hits = [line for line in output.splitlines() if pattern.search(line)]
        assert not hits, f"{what}: {hits[:3]}"


def test_verbose_keeps_ray_and_mlflow_notices(digits_noisy, tmp_path):
    output = run_own_cluster(["--verbose"], [f"data.path={digits_noisy}", "train.epochs=1", "resources.num_workers=0",
                                  "model.width=8", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                  f"tracking.storage_path={tmp_path / 'runs'}"])
    assert ROUTINE["Ray's token-authentication notice for a cluster of our own"].search(output), output[-3000:]
    assert ROUTINE["MLflow's database set-up notices"].search(output), output[-3000:]
    assert "[metacorrect] epoch 1/1" in output
