"""What a sweep of small trials costs with each trial a Ray Train run on one worker, and with each trial running
its loop in the Tune trial itself (`resources.num_workers: 0`): the same ASHA sweep (2 samples of the learning
rate x 2 seeds = 4 trials of 2 epochs, 2 at a time) on digits, the two ways alternated on one warm local
cluster, `--repeats` sweeps each. Printed: the median wall time of each way's sweep and their ratio.

    python benchmarks/sweep_trials.py [--repeats 3] [--method erm]

A Ray Train trial starts a controller, a worker (a new process importing torch and the loop), a
synchronisation actor and a placement-group cleaner before its first step; on a small model that is most of
the trial.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metacorrect  # noqa: E402
from metacorrect.config import ExperimentConfig  # noqa: E402
from metacorrect.datasets.prepare import prepare  # noqa: E402
from metacorrect.platform.cluster import ensure_ray  # noqa: E402

SPACE = {"optim.lr": {"loguniform": [0.01, 0.2]}, "train.seed": {"grid": [0, 1]}}
WAYS = {"one Ray Train worker per trial": 1, "the loop in the trial (num_workers: 0)": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="erm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-trials-"))
    data = work / "digits"
    prepare("digits", data, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    ensure_ray()
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for i in range(args.repeats):
        for way, workers in WAYS.items():
            cfg = ExperimentConfig.from_dict({
                "data": {"path": str(data)}, "method": {"name": args.method},
                "train": {"epochs": 2, "eval_noisy": "off"}, "model": {"arch": "small_cnn", "width": 8},
                "resources": {"num_workers": workers, "max_failures": 0},
                "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "storage_path": str(work / "sweeps"),
                             "experiment": "sweep-trials", "system_metrics": False}})
            started = time.time()
            metacorrect.sweep(cfg, SPACE, num_samples=2, scheduler="asha", max_concurrent_trials=2,
                              name=f"w{workers}-{i}", progress=False)
            times[way].append(time.time() - started)
            print(f"  {way}: {times[way][-1]:.1f} s", flush=True)

    base = next(iter(WAYS))
    print(f"\nASHA sweeps of 4 two-epoch {args.method} trials on digits, 2 at a time, median of {args.repeats}\n")
    print("| trials | sweep s | / one worker per trial |")
    print("|---|---|---|")
    for way in WAYS:
        print(f"| {way} | {statistics.median(times[way]):.1f} | "
              f"{statistics.median(times[way]) / statistics.median(times[base]):.2f} |")


if __name__ == "__main__":
    main()
