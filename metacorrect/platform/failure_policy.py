"""Which training failures Ray Train retries: what a retry can fix, not errors that would happen again.

`resources.max_failures` is for lost workers and nodes (a killed process, a preempted machine, the collective
errors the surviving workers see when a peer dies). An error that comes from the data, the config or the
code (a label out of range, a damaged shard, a TypeError) would happen again identically, so a retry only
costs a worker-group restart per attempt: such a run fails at its first attempt. Every decision is appended
to `failures.jsonl` in the run directory, so a user can see what was retried and why.

Ray's Train controller unpickles the policy, so this module imports nothing heavy (no torch).
"""
from __future__ import annotations

import json
import time

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from metacorrect.errors import ConfigError, DataError, first_line, unwrapped

FAILURES_FILE = "failures.jsonl"

# Errors that a restart reproduces. RuntimeError is not among them: torch.distributed raises it on the workers
# that survive a peer's death, and those runs should resume.
DETERMINISTIC = (DataError, ConfigError, ValueError, TypeError, LookupError, AttributeError, NameError,
                 ArithmeticError, AssertionError, NotImplementedError, ImportError, SyntaxError)


def is_deterministic(error: BaseException) -> bool:
    return isinstance(error, DETERMINISTIC)


def root_error(error: BaseException) -> BaseException:
    """The worker error behind a failed fit: a deterministic one first (the others are its echoes)."""
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        failures = list(error.worker_failures.values())
        return next((e for e in failures if is_deterministic(e)), failures[0])
    return error


def one_line(error: BaseException) -> str:
    """One line for a failure: a data or config error's own message (it names the file or field), otherwise
    `Type: first line`, without Ray's wrapping."""
    error = unwrapped(error)
    if isinstance(error, (DataError, ConfigError)):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error)}"


JOURNAL_GRACE_S = 3.0


class RetryTransientFailures(DefaultFailurePolicy):
    """Ray's default policy, except that a worker error from `DETERMINISTIC` is raised at once."""

    def __init__(self, failure_config, journal: str | None = None):
        super().__init__(failure_config)
        self.journal = journal

    def make_decision(self, training_failed_error) -> FailureDecision:
        errors = getattr(training_failed_error, "worker_failures", None) or {}
        if any(is_deterministic(e) for e in errors.values()):
            decision = FailureDecision.RAISE
        else:
            decision = super().make_decision(training_failed_error)
        self._record(decision, errors or {"controller": training_failed_error})
        return decision

    def _record(self, decision: FailureDecision, errors: dict) -> None:
        if not self.journal:
            return
        # A driver that dies (SIGKILL, a lost head) takes its workers down, and this controller can see their
        # health checks fail before Ray ends the controller too: that is not a training failure. Waiting a
        # moment lets Ray end it first, so only failures of a living run reach the journal.
        time.sleep(JOURNAL_GRACE_S)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "decision": decision.value.lower(),
                 "deterministic": any(is_deterministic(e) for e in errors.values()),
                 "errors": {str(rank): one_line(e) for rank, e in errors.items()}}
        with open(self.journal, "a") as f:
            f.write(json.dumps(entry) + "\n")
