"""What a training failure does: Ray Train retries what a retry can fix, and an interrupt ends the run.

`resources.max_failures` is for lost workers and nodes (a killed process, a preempted machine, the collective
errors the surviving workers see when a peer dies). An error that comes from the data, the config or the
code (a label out of range, a damaged shard, a TypeError) would happen again identically, so a retry only
costs a worker-group restart per attempt: such a run fails at its first attempt. Every decision is appended
to `failures.jsonl` in the run directory, so a user can see what was retried and why.

Ctrl-C and SIGTERM abort the Ray Train run (its controller and workers stop) and reach the caller as
`KeyboardInterrupt`, so the run's MLflow record is closed as KILLED; Ray's own Ctrl-C handler instead exits
the process with status 0 and stays installed after `fit()`.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
from ray.train.v2._internal.util import ObjectRefWrapper
from ray.train.v2.api.exceptions import WorkerGroupError

from metacorrect.config import ConfigError
from metacorrect.datasets.contract import DataError, first_line, unwrapped

FAILURES_FILE = "failures.jsonl"

# Errors that a restart reproduces. RuntimeError is not among them: torch.distributed raises it on the workers
# that survive a peer's death, and those runs should resume.
DETERMINISTIC = (DataError, ConfigError, ValueError, TypeError, LookupError, AttributeError, NameError,
                 ArithmeticError, AssertionError, NotImplementedError, ImportError, SyntaxError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the run is closed as KILLED."""


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
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "decision": decision.value.lower(),
                 "deterministic": any(is_deterministic(e) for e in errors.values()),
                 "errors": {str(rank): one_line(e) for rank, e in errors.items()}}
        with open(self.journal, "a") as f:
            f.write(json.dumps(entry) + "\n")


class Trainer(TorchTrainer):
    """`TorchTrainer` with the failure policy and interrupt handling above (Ray 2.60's `fit`, otherwise as is)."""

    def __init__(self, *args, journal: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._journal = str(journal) if journal else None
        self._controller = None
        self._signal: int | None = None

    def fit(self):
        if self.running_in_local_mode:  # the loop runs in this process: nothing to retry or abort
            return super().fit()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = self._initialize_and_run_controller(
                train_fn_ref=ObjectRefWrapper(self._get_train_func()),
                scaling_policy=create_scaling_policy(self.scaling_config),
                failure_policy=RetryTransientFailures(self.run_config.failure_config, self._journal),
                train_run_context=self.train_run_context,
                callbacks=self._create_default_callbacks(),
                validation_config=self.validation_config)
        except KeyboardInterrupt:
            self._abort()
            if self._signal == signal.SIGTERM:  # Ray re-raises what our handler raised as a plain interrupt
                raise Terminated() from None
            raise
        finally:
            if self._controller is not None:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        if result.error:
            raise result.error
        return result

    def _register_sigint_handler(self, controller) -> None:
        """Called by Ray in the main thread once the controller exists: Ctrl-C and SIGTERM interrupt `fit`."""
        self._controller = controller

        def interrupt(signum, frame):
            self._signal = signum
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)

    def _abort(self) -> None:
        if self._controller is None:
            return
        try:
            ray.get(self._controller.abort.remote(), timeout=60)
        except Exception:  # the controller exits while answering (ray.actor.exit_actor)
            pass
