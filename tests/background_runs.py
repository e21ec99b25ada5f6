"""Runs in the driver (`resources.num_workers: 0`) that end-to-end files share, trained in a background process.

- ("accuracy", setting, method, epochs): the 15-epoch digits runs of the accuracy files (one per method and noise
  setting, seed 0, fixed block order), through conftest's `digits_runs`.
- ("workers", method): test_workers_e2e's one-worker reference of each method (4 epochs, its own settings).

These are CPU-bound training on one core, while most of the rest of the suite waits on Ray starting and stopping
processes with a core to spare. So conftest starts this module as a subprocess with the session's first Ray
test: it joins the session's Ray cluster, trains every run of `PLANNED` in order, and pickles each `RunResult`
into a directory, from which `background_runs` picks it up (a run not planned is trained in the test process).
Its MLflow store is a SQLite file of its own, so two processes never write one database.

    python tests/background_runs.py OUT_DIR WORKDIR TRACKING_URI
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
# In the order the suite asks for them (test_label_methods_e2e, test_methods_e2e, test_methods_reweight_e2e,
# test_workers_e2e).
PLANNED = [*[("accuracy", "sym60", m, ACCURACY_EPOCHS) for m in ("erm", "mslg", "soft_labels", "mlc", "emlc", "ieg")],
           ("accuracy", "pair40", "erm", ACCURACY_EPOCHS), ("accuracy", "pair40", "ieg", ACCURACY_EPOCHS),
           ("accuracy", "sym60", "mwnet", WEIGHT_EPOCHS), ("accuracy", "sym60", "l2rw", WEIGHT_EPOCHS),
           *[("workers", m) for m in WORKERS_METHODS]]


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

    common = [f"data.path={data}", f"train.epochs={WORKERS_EPOCHS}", "model.width=16", f"tracking.uri={tracking_uri}",
              f"tracking.storage_path={workdir / 'runs'}", "tracking.experiment=tests-workers"]
    return ExperimentConfig.from_yaml(config_file(method), method_overrides(method, common))


def train(workdir: Path, tracking_uri: str, key: tuple):
    """The run of `key`, trained here."""
    from digits_accuracy import config_file

    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    if key[0] == "workers":
        cfg = workers_config(key[1], digits(workdir, "sym60"), workdir, tracking_uri)
        return run(cfg.with_overrides(["resources.num_workers=0", "data.deterministic=true"]), progress=False)
    _, setting, method, epochs = key
    overrides = [f"data.path={digits(workdir, setting)}", f"train.epochs={epochs}", "resources.num_workers=0",
                 "data.deterministic=true", f"tracking.uri={tracking_uri}",
                 f"tracking.storage_path={workdir / 'runs'}", "tracking.experiment=tests-e2e"]
    overrides += ["method.name=clean_only"] if method == "clean_only" else []
    return run(ExperimentConfig.from_yaml(config_file(method), overrides), progress=False)


def main(out: str, workdir: str, tracking_uri: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key in PLANNED:
        result = train(Path(workdir), tracking_uri, key)
        target = result_file(out_dir, key)
        scratch = target.with_suffix(".tmp")
        scratch.write_bytes(pickle.dumps(result))
        os.replace(scratch, target)  # whole or absent: the fixture never reads half a file


if __name__ == "__main__":
    main(*sys.argv[1:4])
