"""The `TorchTrainer` of a run: the failure policy of `failure_policy.py`, and interrupts that end the run.

Ctrl-C and SIGTERM abort the Ray Train run (its controller and workers stop) and reach the caller as
`KeyboardInterrupt`, so the run's MLflow record is closed as KILLED; Ray's own Ctrl-C handler instead exits
the process with status 0 and stays installed after `fit()`. This overrides Ray 2.60's `fit` (the project
pins that version); the fault tests run through it.
"""
from __future__ import annotations

import signal
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
from ray.train.v2._internal.util import ObjectRefWrapper

from metacorrect.platform.failure_policy import RetryTransientFailures


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the run is closed as KILLED."""



class Trainer(TorchTrainer):
    """`TorchTrainer` with the failure policy and interrupt handling above (Ray 2.60's `fit`, otherwise as is)."""

    def __init__(self, *args, journal: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._journal = str(journal) if journal else None
        self._controller = None
        self._signal: int | None = None

    def fit(self):
        if self.running_in_local_mode:
            return self._fit_in_this_process()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = self._initialize_and_run_controller(
                train_fn_ref=ObjectRefWrapper(self._get_train_func()),
                scaling_policy=create_scaling_policy(self.scaling_config),
                failure_policy=RetryTransientFailures(self.run_config.failure_config, self._journal),
                train_run_context=self.train_run_context,
                callbacks=self._callbacks(),
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

    def _fit_in_this_process(self) -> ray.train.Result:
        """Local mode (`num_workers: 0`): the loop in this process, without Ray Train, whose training APIs refuse
        to run inside a Tune trial (Ray 2.60); the loop keeps its own checkpoints. Nothing to retry or abort: an
        error or Ctrl-C propagates as is, and SIGTERM as `Terminated`, so the run is closed as KILLED."""
        import threading

        from metacorrect.platform.records import latest_local_checkpoint

        main = threading.current_thread() is threading.main_thread()  # a Tune trial runs it in another thread
        previous = signal.signal(signal.SIGTERM, self._terminate) if main else None
        try:
            self.train_loop_per_worker(self.train_loop_config)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        checkpoint = latest_local_checkpoint(Path(self.train_loop_config["run"]["local_checkpoints"]))
        return ray.train.Result(metrics=None, checkpoint=checkpoint, error=None, path=None)

    def _callbacks(self) -> list:
        """Ray Train's default callbacks, less the datasets one when no dataset streams through Ray Train: it
        would start a DatasetManager actor for nothing (the cached splits reach the workers with the loop's
        config, `data_config.RunDatasets`)."""
        callbacks = self._create_default_callbacks()
        return [cb for cb in callbacks if self.datasets or not isinstance(cb, DatasetsCallback)]

    @staticmethod
    def _terminate(signum, frame):
        raise Terminated()

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
