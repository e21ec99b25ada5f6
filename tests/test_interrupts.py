"""Ctrl-C and SIGTERM wait for the MLflow call they arrive in (`platform/interrupts.py`), then act as they would
have: a SQLite store is never left locked by a half-done transaction, so the run can still be closed KILLED.
(The local-mode fault test in test_faults.py sends Ctrl-C the moment an epoch commits, into its MLflow write.)"""
from __future__ import annotations

import os
import signal
import threading

import pytest

from metacorrect.platform import interrupts, tracking


def test_ctrl_c_inside_the_block_is_raised_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block went on")
    assert done == ["the block went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C's handler is back"


def test_sigterm_reaches_the_handler_in_place_before_once_and_nested_blocks_hold_it_to_the_outer_end():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with interrupts.deferred():
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [], "held until the outer block ends"
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_it_changes_nothing():
    errors = []

    def work():
        try:
            with interrupts.deferred():
                pass
        except Exception as e:  # signal.signal raises ValueError outside the main thread
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []


def test_ctrl_c_inside_an_mlflow_write_lets_it_finish_and_the_run_closes_killed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.start_run(uri, "held", "cut", tmp_path / "run")
    original = MlflowClient.log_batch

    def log_batch(self, *args, **kwargs):  # Ctrl-C arrives while MLflow writes
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(KeyboardInterrupt):
        with tracking.closed_on_failure(uri, run_id):
            tracking.log_rows(uri, run_id, [(1, {"train_loss": 0.5, "epoch": 1})])
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1], "the write finished whole"
    assert client.get_run(run_id).data.tags["epoch"] == "1"
    assert client.get_run(run_id).info.status == "KILLED"
