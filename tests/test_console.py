"""The console of a run shows the project's own lines, its results and real warnings: none of Ray's or MLflow's
routine notices. A real `metacorrect run` on two Ray Train workers with its noisy split streamed (conftest's
`cli_run_two_workers_streamed`), in a process of its own on a cluster of its own with the project's defaults
(not the test session's Ray settings). `--verbose` keeps those notices: conftest's local-mode run, which joins
the session's cluster, has it on its first start and not on its second."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

# What each routine notice looks like, and where it came from before the project quieted it.
ROUTINE = {
    "an error-level line of Ray's C++ core (the preemption watcher's)": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]"),
    "a deprecation warning (Ray's own DataConfig defaults)": re.compile(r"DeprecationWarning"),
    "a FutureWarning (torch scripting its JVP decompositions)": re.compile(r"FutureWarning"),
    "the source line Python prints under a warning": re.compile(r"^\s*(\(\w+ pid=\d+\)\s*)?\s*(warnings\.warn\(|self\.\w+ = )"),
    "Ray's token-authentication notice for a cluster of our own": re.compile(r"Token authentication is enabled"),
    "MLflow's database set-up notices": re.compile(r"INFO mlflow\."),
    "Ray Data's execution notices": re.compile(r"Starting execution of Dataset"),
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


def test_verbose_keeps_ray_and_mlflow_notices(local_run_stopped_twice):
    """`--verbose` on a run that joins a cluster (conftest's local-mode run, whose first start has it): Ray Data's
    and MLflow's notices stay on the console; the same run's next start, without it, shows neither."""
    (_, _, verbose), (_, _, plain) = local_run_stopped_twice.starts
    assert "[metacorrect] epoch 1/6" in verbose and "[metacorrect] epoch" in plain
    for what in ("Ray Data's execution notices", "MLflow's database set-up notices"):
        assert ROUTINE[what].search(verbose), (what, verbose[-3000:])
    for what, pattern in ROUTINE.items():
        hits = [line for line in plain.splitlines() if pattern.search(line)]
        assert not hits, f"{what}: {hits[:3]}"
