"""Shared fixtures: one local Ray cluster per test session, an MLflow SQLite store, prepared digits."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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
# The suite's Ray clusters (this session's, the background's, those its subprocesses start) live for the whole
# run, and a cluster's periodic work is paid for every second it lives: on a box twice as slow, twice over
# (docs/benchmarks.md, "Where the suite's work goes"). Ray's log monitor, its largest part there, looks for new
# worker log files ten times a second while it watches fewer files than this threshold (1000 by default); at 0
# it looks every 0.5 s (it still streams each file from its start). No test reads Ray's usage reports. (Ray's
# metrics and task events stay on: with them off too, two suites each left a Ray Train controller hung in
# Ray's exit.)
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # tests share the benchmarks' settings


def pytest_configure(config) -> None:
    """A suite started in the background by a shell (`make test &`, nohup, some CI runners) inherits SIGINT
    ignored, and so would every process it starts: the Ctrl-C tests need it as a terminal delivers it."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests that need no Ray first, each file's order kept: several check that a bad input is refused before
    Ray starts (`ray.is_initialized()` in this process), which the session's cluster, once up, would hide. The
    tests that read tests/background_runs.py's runs last: the background trains them at the lowest priority, on
    the CPU the other tests leave idle, for as long as the rest of the suite takes."""
    def order(item) -> tuple[bool, bool]:
        names = getattr(item, "fixturenames", ())
        return "ray_cluster" in names or "background_runs" in names, "background_runs" in names

    items.sort(key=order)


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
        # address="local": a cluster of its own even where `ray start` left one running on this machine. With the
        # dashboard: Ray Train's placement-group cleaner asks the state API, which the dashboard serves, whether
        # a run's controller is alive, and without it the workers' resources of a trial that ASHA stopped stay
        # reserved and the next run on the cluster waits forever (test_sweep.py's ASHA sweep did).
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR",
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
    """digits with 60% symmetric noise, 10 clean images per class (the demo's data set; the background runs'
    "sym60" too)."""
    from background_runs import digits

    return digits(workdir, "sym60")


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


# Which of tests/background_runs.py's kinds of runs each file uses (its `digits_runs` / `background_runs`).
BACKGROUND_KINDS = {"test_workers_e2e.py": ("workers", "two_workers", "two_workers_left_behind")}


@pytest.fixture(scope="session")
def _background_wanted(request) -> tuple[str, ...]:
    """The kinds of background runs the selected tests use (none: no background process)."""
    kinds: set[str] = set()
    for item in request.session.items:
        if "background_runs" in item.fixturenames:
            kinds.update(BACKGROUND_KINDS.get(item.path.name, ("accuracy",)))
    return tuple(sorted(kinds))


@pytest.fixture(scope="session")
def _background_process(request, digits_noisy, workdir):
    """tests/background_runs.py started beside the suite, on a Ray cluster of its own, when a test that uses its
    runs is selected; None otherwise. Ended (its process group, by pid) when the session ends, if it is still
    running."""
    import subprocess

    from procs import stop_group

    if not request.getfixturevalue("_background_wanted"):
        yield None
        return
    out, log = workdir / "background-runs", workdir / "background-runs.log"
    out.mkdir()  # here, not only in the process: a test may claim a run before that process has started
    env = os.environ | {"RAY_ADDRESS": "local", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("background_runs.py")), str(out),
                                 str(workdir), f"sqlite:///{workdir / 'mlruns-background' / 'mlflow.db'}",
                                 ",".join(request.getfixturevalue("_background_wanted"))],
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, out, log
    finally:
        stop_group(proc.pid)


@pytest.fixture(autouse=True)
def _start_background_runs(request, _background_wanted):
    """The background runs start with the session's first test, so that they overlap the tests without the
    session's cluster too (those run first: unit tests, and the ones that start Ray clusters of their own). Its
    Ray runs in another process: the tests that check that nothing started Ray in this one still can."""
    if _background_wanted:
        request.getfixturevalue("_background_process")


@pytest.fixture(scope="session")
def background_runs(_background_process, _background_wanted, workdir, tracking_uri):
    """`get(key)`: the `RunResult` of a run of tests/background_runs.py, once per session: from the background
    process when the key is planned there and it has taken it, else trained here (`get.trained_here`)."""
    import pickle
    import time

    from background_runs import LEFT_BEHIND, PLANNED, claim, result_file, train

    cache = {}
    trained_here: set[tuple] = set()

    def get(key: tuple):
        if key in cache:
            return cache[key]
        if key in PLANNED and _background_process is not None and key[0] in _background_wanted:
            proc, out, log = _background_process
            path = result_file(out, key)
            if not path.is_file() and key != LEFT_BEHIND and claim(out, key):  # the background has not reached it
                cache[key] = train(workdir, tracking_uri, key)
                trained_here.add(key)
                return cache[key]
            deadline = time.time() + 1200
            while not path.is_file():
                if proc.poll() is not None and not path.is_file():
                    raise AssertionError(f"the background runs exited ({proc.returncode}) before {key}:\n"
                                         + log.read_text(errors="replace")[-4000:])
                assert time.time() < deadline, f"{key}: not trained within 20 min"
                time.sleep(0.2)
            cache[key] = pickle.loads(path.read_bytes())
        else:
            cache[key] = train(workdir, tracking_uri, key)
            trained_here.add(key)
        return cache[key]

    get.trained_here = trained_here  # the keys this process trained itself
    return get


@pytest.fixture(scope="session")
def digits_runs(background_runs):
    """`get(setting, method, epochs=15)`: that method's digits config trained on digits with that noise (seed 0,
    the loop in the driver, fixed block order), once per session and shared by the end-to-end accuracy files."""
    from background_runs import ACCURACY_EPOCHS

    def get(setting: str, method: str, epochs: int = ACCURACY_EPOCHS):
        return background_runs(("accuracy", setting, method, epochs))

    return get


@dataclass(frozen=True)
class StoppedRun:
    """`local_run_stopped_twice`: the `--set` values of its starts, its MLflow store and run id, and for each start
    (exit status, the MLflow run's status after it, its console)."""
    sets: list[str]
    uri: str
    run_id: str
    starts: list[tuple[int, str, str]]


@pytest.fixture(scope="session")
def local_run_stopped_twice(ray_cluster, digits_noisy, tmp_path_factory) -> StoppedRun:
    """`metacorrect run` in local mode (`num_workers: 0`, the loop in the driver, 6 epochs) on the session's
    cluster: stopped by SIGTERM once an epoch is committed, then started again with the same name and stopped by
    Ctrl-C once another is. The first start has `--verbose`. One pair of starts for two files' claims (each start
    is a process importing torch, Ray and MLflow): test_faults checks the stops (and resumes the run),
    test_console the verbose console."""
    import json
    import signal

    from mlflow.tracking import MlflowClient

    from procs import set_args, start_and_signal

    out = tmp_path_factory.mktemp("local-stopped")
    uri = f"sqlite:///{out / 'mlruns.db'}"
    sets = ["resources.num_workers=0", "model.width=8", "train.epochs=6", f"data.path={digits_noisy}",
            f"tracking.uri={uri}", f"tracking.storage_path={out / 'runs'}", "tracking.run_name=local"]
    args = ["run", "configs/digits_demo.yaml", *set_args(sets)]
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    run_dir = out / "runs" / "local"

    def committed_epochs() -> set[str]:  # a local checkpoint is committed by its rename into place
        return {p.name for p in (run_dir / "local_checkpoints").glob("checkpoint_epoch*")}

    starts = []
    for flags, sig in ((["--verbose"], signal.SIGTERM), ([], signal.SIGINT)):
        done, log = committed_epochs(), out / f"start{len(starts) + 1}.log"
        code = start_and_signal(args + flags, log, env, sig, lambda: committed_epochs() - done)
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        starts.append((code, MlflowClient(uri).get_run(run_id).info.status, log.read_text(errors="replace")))
    return StoppedRun(sets, uri, run_id, starts)


# erm_two_workers_one_killed's step checkpoints and step metrics
KILLED_STEPS_PER_EPOCH = 18  # global batches of 64 over 1138 noisy rows: 17 full, one of 50
KILLED_CHECKPOINT_EVERY = 5
KILLED_LOG_EVERY = 4


@pytest.fixture(scope="session")
def erm_two_workers_one_killed(ray_cluster, digits_noisy, workdir, tracking_uri):
    """erm on two Ray Train workers with test_workers_e2e's settings, plus a step checkpoint every 5 steps, step
    metrics every 4 and the ids each step trains on (`train.trace_ids_dir`); one worker is SIGKILLed by pid once a
    step checkpoint inside epoch 2 is committed, and Ray retries from the last commit. One run for three claims
    (on 2 cores a Ray Train start costs more than its epochs): test_faults checks the retry and the records,
    test_step_checkpoints the resume inside the epoch, and test_workers_e2e uses it as erm's two-worker run (a
    retried run must still learn what one worker learns).
    Returns (result, run directory, trace directory, the killed pid, Ray Train dataset managers started)."""
    import signal
    import threading
    import time

    from background_runs import workers_config
    from ray_state import actors_started, train_worker_pids
    from run_dirs import mid_epoch_committed

    from metacorrect.platform.trainer import run

    trace = workdir / "trace-erm-one-worker-killed"
    cfg = workers_config("erm", digits_noisy, workdir, tracking_uri).with_overrides(
        ["tracking.run_name=erm-one-worker-killed", "resources.num_workers=2",
         f"train.checkpoint_every={KILLED_CHECKPOINT_EVERY}", f"train.log_every={KILLED_LOG_EVERY}",
         f"train.trace_ids_dir={trace}"])
    run_dir = workdir / "runs" / "erm-one-worker-killed"
    outcome = {}
    managers = actors_started("DatasetManager")
    driver = threading.Thread(target=lambda: outcome.update(result=run(cfg, progress=False)))
    driver.start()
    killed = None
    try:
        deadline = time.time() + 240
        pids = []
        while len(pids) < 2:  # asked before the moment: the state API can take a second on a loaded box
            assert driver.is_alive() and time.time() < deadline, "the two workers never started"
            pids = train_worker_pids()
            time.sleep(0.05)
        while not mid_epoch_committed(run_dir, after_epochs=1):
            assert driver.is_alive() and time.time() < deadline, "no step checkpoint inside epoch 2"
            time.sleep(0.01)
        killed = pids[-1]
        os.kill(killed, signal.SIGKILL)  # one worker: the other sees a collective error
    finally:
        driver.join(timeout=300)
    return outcome["result"], run_dir, trace, killed, actors_started("DatasetManager") - managers


@pytest.fixture(scope="session")
def cli_run_two_workers_streamed(digits_noisy, tmp_path_factory):
    """`metacorrect run configs/digits_demo.yaml` as a user starts it: a process and a Ray cluster of its own with
    the project's settings (not the test session's Ray Train timings), mlc on two Ray Train workers, the noisy
    split streamed (`data.cache_mb: 0`), 2 epochs, the ids each step trains on traced. One run for two files'
    claims (a Ray Train start costs more than its epochs): test_console reads its console, test_platform its
    traces. Returns (console output without colours, trace directory)."""
    from procs import run_own_cluster

    out = tmp_path_factory.mktemp("cli-run")
    sets = [f"data.path={digits_noisy}", "train.epochs=2", "resources.num_workers=2", "model.width=8",
            "method.name=mlc", "data.cache_mb=0", f"train.trace_ids_dir={out / 'trace'}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"tracking.storage_path={out / 'runs'}"]
    output = run_own_cluster([], sets)
    return output, out / "trace"
