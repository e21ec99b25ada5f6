"""Shared fixtures: one local Ray cluster per test session, an MLflow SQLite store, prepared digits."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


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
