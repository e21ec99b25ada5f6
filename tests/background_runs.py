"""Runs that end-to-end files share, trained in a background process.

- ("accuracy", setting, method, epochs): the 15-epoch digits runs of the accuracy files (one per method and noise
  setting, seed 0, fixed block order, the loop in the driver), through conftest's `digits_runs`.
- ("workers", method): test_workers_e2e's one-worker reference of each method (4 epochs, its own settings).
- ("two_workers", method): the same on two Ray Train workers (erm's is conftest's run with a worker killed),
  two runs at a time on a Ray cluster of this process's own; then ("two_workers_left_behind",): the actors and
  placement groups those runs left (Ray's state API, this process's job), which must be none.

Most of the rest of the suite waits on Ray starting and stopping processes with a core to spare, so conftest starts
this module as a subprocess with the session's first test: it trains every run of `PLANNED` in order and pickles
each result into a directory, from which `background_runs` picks it up. Each run is claimed (a file created
exclusively) before it is trained: a run the session asks for before the background reached it, or one not planned
here, is trained in the test process instead, so a run of one file never waits on a queue. It runs at the lowest
priority (`_lower_priority`): it yields the CPU to the other tests and takes what they leave idle, and the tests
that read its runs come last. This process runs on a Ray cluster of its own (RAY_ADDRESS=local), started with the
session's first test: its runs overlap the tests that run before the session's cluster starts, and its CPUs never
keep a test's run waiting for its resources on the session's two. Its MLflow store is a SQLite file of its own, so
two processes never write one database.

    python tests/background_runs.py OUT_DIR WORKDIR TRACKING_URI KIND[,KIND...]

KIND is the first element of the keys to train ("accuracy", "workers", "two_workers", ...), the ones the selected
tests use: a run of one test file trains only what it reads.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # each method's digits config and the two-worker test's settings

SETTINGS = {"sym60": "symmetric:0.6", "sym40": "symmetric:0.4", "pair40": "pair:0.4"}
ACCURACY_EPOCHS = 15  # one budget for every method; benchmarks/digits_accuracy.py measures it over 5 seeds
WEIGHT_EPOCHS = 2  # mwnet and l2rw end to end: they log their weights (test_methods_reweight_e2e.py)
WORKERS_EPOCHS = 4  # tests/test_workers_e2e.py and benchmarks/workers_agreement.py
WORKERS_METHODS = ("erm", "clean_only", "mlc", "emlc", "mslg", "soft_labels", "ieg", "mwnet", "l2rw")
TWO_WORKER_METHODS = tuple(m for m in WORKERS_METHODS if m != "erm")  # erm's: conftest's killed-and-retried run
LEFT_BEHIND = ("two_workers_left_behind",)
# The other tests first: this process (and its Ray cluster) takes the CPU they leave idle, and the tests that read
# its runs come last (conftest's test order). The lowest niceness: Ray starts its workers 15 steps nicer than their
# raylet, so a test's own Ray Train workers run at 15, and a background at 10 would take the CPU from them.
NICENESS = 19
# How long this cluster's Ray Train runs may take to start their workers (Ray Train's default is 60 s): at the lowest
# priority, with the rest of the suite busy on every core, starting two workers can take longer.
WORKER_GROUP_START_TIMEOUT_S = 900
# In the order the suite asks for them (test_label_methods_e2e, test_methods_e2e, test_methods_reweight_e2e,
# test_workers_e2e).
PLANNED = [*[("accuracy", "sym60", m, ACCURACY_EPOCHS) for m in ("erm", "mslg", "soft_labels", "mlc", "emlc", "ieg")],
           ("accuracy", "pair40", "erm", ACCURACY_EPOCHS), ("accuracy", "pair40", "ieg", ACCURACY_EPOCHS),
           ("accuracy", "sym60", "mwnet", WEIGHT_EPOCHS), ("accuracy", "sym60", "l2rw", WEIGHT_EPOCHS),
           *[("workers", m) for m in WORKERS_METHODS],
           *[("two_workers", m) for m in TWO_WORKER_METHODS], LEFT_BEHIND]


def result_file(out: Path, key: tuple) -> Path:
    return out / ("-".join(map(str, key)) + ".pkl")


def digits(workdir: Path, setting: str) -> Path:
    """Digits with that noise, 10 clean images per class, seed 0 (prepared on first use)."""
    from metacorrect.datasets.prepare import prepare

    data = workdir / "data" / f"digits-{setting}"
    if not data.exists():
        prepare("digits", data, noise=SETTINGS[setting], clean_per_class=10, seed=0, progress=False)
    return data


def workers_config(method: str, data: Path, workdir: Path, tracking_uri: str):
    """test_workers_e2e's config of `method` (benchmarks/workers_agreement.py measured its bounds with it)."""
    from workers_agreement import config_file, method_overrides

    from metacorrect.config import ExperimentConfig

    # No system metrics: their monitor makes each run's first worker import MLflow (~1 core-second); the runs
    # that check them are test_mlflow_inputs.py's.
    common = [f"data.path={data}", f"train.epochs={WORKERS_EPOCHS}", "model.width=16", f"tracking.uri={tracking_uri}",
              f"tracking.storage_path={workdir / 'runs'}", "tracking.experiment=tests-workers",
              "tracking.system_metrics=false"]
    return ExperimentConfig.from_yaml(config_file(method), method_overrides(method, common))


def two_workers_config(method: str, workdir: Path, tracking_uri: str):
    """`workers_config` on two workers of a quarter CPU each, so two runs at a time leave Ray Data a CPU."""
    return workers_config(method, digits(workdir, "sym60"), workdir, tracking_uri).with_overrides(
        ["resources.num_workers=2", "resources.cpus_per_worker=0.25"])


def train(workdir: Path, tracking_uri: str, key: tuple):
    """The run of `key`, trained here (in this process's Ray cluster, whichever that is)."""
    from digits_accuracy import config_file

    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    if key[0] == "workers":
        cfg = workers_config(key[1], digits(workdir, "sym60"), workdir, tracking_uri)
        return run(cfg.with_overrides(["resources.num_workers=0", "data.deterministic=true"]), progress=False)
    if key[0] == "two_workers":
        return run(two_workers_config(key[1], workdir, tracking_uri), progress=False)
    if key == LEFT_BEHIND:
        raise ValueError("what two-worker runs left behind is measured where they ran, beside them")
    _, setting, method, epochs = key
    overrides = [f"data.path={digits(workdir, setting)}", f"train.epochs={epochs}", "resources.num_workers=0",
                 "data.deterministic=true", f"tracking.uri={tracking_uri}",
                 f"tracking.storage_path={workdir / 'runs'}", "tracking.experiment=tests-e2e"]
    overrides += ["method.name=clean_only"] if method == "clean_only" else []
    return run(ExperimentConfig.from_yaml(config_file(method), overrides), progress=False)


def claim(out_dir: Path, key: tuple) -> bool:
    """Take `key` for this process: True when no process (this one, or the test session that asks for a run the
    background has not reached yet) took it before."""
    try:
        os.close(os.open(result_file(out_dir, key).with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def save(out_dir: Path, key: tuple, result) -> None:
    target = result_file(out_dir, key)
    scratch = target.with_suffix(".tmp")
    scratch.write_bytes(pickle.dumps(result))
    os.replace(scratch, target)  # whole or absent: the fixture never reads half a file


def _two_worker_runs(out_dir: Path, workdir: Path, tracking_uri: str) -> None:
    """Every ("two_workers", m) not taken by the test session, two at a time (on 2 cores most of a short run is
    Ray starting and stopping processes, which overlaps well); then (actors left, placement groups left, runs
    checked)."""
    from concurrent.futures import ThreadPoolExecutor

    from ray_state import alive_actors, left_behind

    keys = iter([("two_workers", m) for m in TWO_WORKER_METHODS])
    trained = []

    def work() -> None:
        for key in keys:  # each thread takes the next key; a shared iterator hands each key out once
            if claim(out_dir, key):
                save(out_dir, key, train(workdir, tracking_uri, key))
                trained.append(key)

    before = alive_actors()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(work) for _ in range(2)]:
            future.result()
    save(out_dir, LEFT_BEHIND, (*left_behind(before), len(trained)))


def _lower_priority() -> None:
    """This process and every process it starts (its Ray cluster's too) run only on CPU the suite leaves idle."""
    os.nice(NICENESS)
    try:  # Linux: below any niceness, a task that runs when no other wants the core
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    # Where Linux schedules by autogroup (a group per session, this process leads one), priorities count only
    # within the group; between groups, the group's own niceness does.
    try:
        Path("/proc/self/autogroup").write_text(str(NICENESS))
    except OSError:  # not Linux, or autogroup scheduling is off
        pass


def main(out: str, workdir: str, tracking_uri: str, kinds: str) -> None:
    import ray

    from metacorrect.platform.cluster import ensure_ray

    out_dir, wanted = Path(out), set(kinds.split(","))
    out_dir.mkdir(parents=True, exist_ok=True)
    _lower_priority()  # before Ray starts: its processes inherit it
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_GROUP_START_TIMEOUT_S))
    # RAY_ADDRESS=local: a cluster of this process's own. No dashboard: nothing here needs it (no sweep: the
    # session's cluster keeps it for Ray Train's placement-group cleaner, conftest's `ray_cluster`), and on a box
    # twice as slow its processes took ~28 core-seconds of the suite's CPU (docs/benchmarks.md).
    ensure_ray(include_dashboard=False)
    # Whatever in this process looks for a cluster by RAY_ADDRESS finds this one ("local" would start another).
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        for key in PLANNED:
            if key[0] in wanted and key[0] not in ("two_workers", *LEFT_BEHIND) and claim(out_dir, key):
                save(out_dir, key, train(Path(workdir), tracking_uri, key))
        if "two_workers" in wanted:
            _two_worker_runs(out_dir, Path(workdir), tracking_uri)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
