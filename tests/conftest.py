"""Shared fixtures: one local Ray cluster per test session, an MLflow SQLite store, prepared digits."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Train timings for a suite of short runs, set before the test cluster starts so that every Ray process
# inherits them (the drivers the tests start as subprocesses too). The controller polls its workers every 2 s
# by default, so each run ends, and each report is taken, up to 2 s late; the preemption watcher is one more
# actor per run and only acts on cloud nodes that announce preemption. Measured on the 2-core box: a one-epoch
# two-worker run takes 12 s instead of 15 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # tests share the benchmarks' settings


@pytest.fixture
def float64_one_thread():
    """float64 for tight tolerances; one intra-op thread (tiny models, and the CI box has 2 cores)."""
    import torch

    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by every test that trains (started on first use)."""
    import ray

    from metacorrect.platform import quiet, workers

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR",
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                                           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                           quiet.ENV: quiet.ray_data_console_config()},
                              # frees the resources of ASHA-stopped trials even with other Ray instances around
                              "worker_process_setup_hook": workers.SETUP_HOOK})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("metacorrect")


@pytest.fixture(scope="session")
def tracking_uri(workdir):
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(scope="session")
def digits_noisy(workdir):
    """digits with 60% symmetric noise, 10 clean images per class (the demo's data set)."""
    from metacorrect.datasets.prepare import prepare

    path = workdir / "data" / "digits-sym60"
    prepare("digits", path, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    return path


@pytest.fixture(scope="session")
def digits_clean(workdir):
    from metacorrect.datasets.prepare import prepare

    path = workdir / "data" / "digits-clean"
    prepare("digits", path, noise="none", clean_per_class=10, seed=0, progress=False)
    return path


@pytest.fixture
def experiment(workdir, tracking_uri):
    """Build a small ExperimentConfig on a prepared data set, tracked in the session's store."""
    from metacorrect.config import ExperimentConfig

    def make(data_path, **overrides):
        raw = {"data": {"path": str(data_path)},
               "train": {"epochs": 2, "batch_size": 64, "clean_batch_size": 32},
               "model": {"arch": "small_cnn", "width": 16},
               "resources": {"num_workers": 2},
               "tracking": {"uri": tracking_uri, "storage_path": str(workdir / "runs"), "experiment": "tests"}}
        cfg = ExperimentConfig.from_dict(raw)
        return cfg.with_overrides([f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])

    return make


DIGITS_SETTINGS = {"sym60": "symmetric:0.6", "sym40": "symmetric:0.4", "pair40": "pair:0.4"}
ACCURACY_EPOCHS = 15  # one budget for every method; benchmarks/digits_accuracy.py measures it over 5 seeds


@pytest.fixture(scope="session")
def digits_runs(ray_cluster, digits_noisy, workdir, tracking_uri):
    """`get(setting, method, epochs=15)`: that method's digits config trained on digits with that noise (seed 0,
    the loop in the driver, fixed block order), run once per session and shared by the end-to-end files."""
    from digits_accuracy import config_file  # benchmarks/: each method's digits config

    from metacorrect.config import ExperimentConfig
    from metacorrect.datasets.prepare import prepare
    from metacorrect.platform.trainer import run

    cache = {}

    def get(setting: str, method: str, epochs: int = ACCURACY_EPOCHS):
        if (setting, method, epochs) not in cache:
            data = digits_noisy if setting == "sym60" else workdir / "data" / f"digits-{setting}"
            if not data.exists():
                prepare("digits", data, noise=DIGITS_SETTINGS[setting], clean_per_class=10, seed=0, progress=False)
            overrides = [f"data.path={data}", f"train.epochs={epochs}", "resources.num_workers=0",
                         "data.deterministic=true", f"tracking.uri={tracking_uri}",
                         f"tracking.storage_path={workdir / 'runs'}", "tracking.experiment=tests-e2e"]
            overrides += ["method.name=clean_only"] if method == "clean_only" else []
            cache[setting, method, epochs] = run(ExperimentConfig.from_yaml(config_file(method), overrides),
                                                 progress=False)
        return cache[setting, method, epochs]

    return get


WORKERS_EPOCHS = 4  # tests/test_workers_e2e.py and benchmarks/workers_agreement.py


@pytest.fixture(scope="session")
def erm_two_workers_one_killed(ray_cluster, digits_noisy, workdir, tracking_uri):
    """erm on two Ray Train workers with test_workers_e2e's settings, one worker SIGKILLed by pid once epoch 2's
    checkpoint is written: Ray retries from the last commit. The fault test checks the retry and the records,
    test_workers_e2e uses it as erm's two-worker run (a retried run must still learn what one worker learns)."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors
    from workers_agreement import config_file, method_overrides

    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    storage = workdir / "runs"
    common = [f"data.path={digits_noisy}", f"train.epochs={WORKERS_EPOCHS}", "model.width=16",
              f"tracking.uri={tracking_uri}", f"tracking.storage_path={storage}", "tracking.experiment=tests-workers",
              "tracking.run_name=erm-one-worker-killed", "resources.num_workers=2"]
    cfg = ExperimentConfig.from_yaml(config_file("erm"), method_overrides("erm", common))
    run_dir = storage / "erm-one-worker-killed"
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(result=run(cfg, progress=False)))
    driver.start()
    killed = None
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoint_epoch0002").exists():
            assert driver.is_alive() and time.time() < deadline, "epoch 2 was never checkpointed"
            time.sleep(0.01)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        killed = workers[-1]["pid"]
        os.kill(killed, signal.SIGKILL)  # one worker: the other sees a collective error
    finally:
        driver.join(timeout=300)
    return outcome["result"], run_dir, killed
