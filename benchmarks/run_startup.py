"""What a short run on Ray Train costs beyond its epochs, with the cached splits handed to the workers in the
training function's arguments (the platform's way) and through Ray Train's dataset manager (the way before):
one-epoch digits runs on one Ray Train worker, the two ways alternated on one warm cluster, `--repeats` runs
each. Printed: the median time of `fit()` (Ray Train's start, the epoch, its stop) and of the whole run, and
the ratio of the two ways.

    python benchmarks/run_startup.py [--repeats 5] [--method erm]

On 2 cores most of a short run is Ray starting processes (the controller, the worker and its imports, and the
dataset manager for datasets given to Ray Train): a sweep of short trials, and the test suite, pay it per run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.config import ExperimentConfig  # noqa: E402
from metacorrect.platform import trainer  # noqa: E402
from metacorrect.platform.data_config import RunDatasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def through_ray_train(build):
    """`trainer.build_trainer` with every dataset, the cached ones too, given to Ray Train (its dataset manager)."""
    def wrapped(*args, **kwargs):
        t = build(*args, **kwargs)
        handed = t.train_loop_config["datasets"]
        t.datasets = dict(t.datasets) | handed.cached
        t.train_loop_config["datasets"] = RunDatasets({}, handed.config)
        return t
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="erm")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="run-startup-"))
    build, fit = trainer.build_trainer, trainer.fit_tracked
    fit_times: list[float] = []

    def timed_fit(*a, **k):
        started = time.time()
        try:
            return fit(*a, **k)
        finally:
            fit_times.append(time.time() - started)

    trainer.fit_tracked = timed_fit
    ways = {"cached splits in the loop's arguments": build, "every split through Ray Train": through_ray_train(build)}
    times: dict[str, dict[str, list[float]]] = {w: {"fit": [], "run": []} for w in ways}
    config = ROOT / "configs" / ("digits_demo.yaml" if args.method in ("erm", "clean_only") else f"digits_{args.method}.yaml")
    common = [f"method.name={args.method}", "train.epochs=1", "model.width=8", "resources.num_workers=1",
              "resources.cpus_per_worker=1", "tracking.system_metrics=false", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
              f"tracking.storage_path={work / 'runs'}", f"data.path={work / 'digits'}"]
    trainer.run(ExperimentConfig.from_yaml(config, common + ["tracking.run_name=warm-up"]), progress=False)
    for i in range(args.repeats):
        for way, builder in ways.items():
            trainer.build_trainer = builder
            result = trainer.run(ExperimentConfig.from_yaml(config, common + [f"tracking.run_name={way[:5]}-{i}"]),
                                 progress=False)
            times[way]["fit"].append(fit_times[-1])
            times[way]["run"].append(result.wall_s)
            print(f"  {way}: fit {fit_times[-1]:.1f} s, run {result.wall_s:.1f} s", flush=True)
    trainer.build_trainer, trainer.fit_tracked = build, fit

    base = "every split through Ray Train"
    print(f"\none-epoch {args.method} runs on digits, one Ray Train worker, median of {args.repeats}\n")
    print("| way | fit() s | run s | fit / before | run / before |")
    print("|---|---|---|---|---|")
    for way in ways:
        f, r = statistics.median(times[way]["fit"]), statistics.median(times[way]["run"])
        fb, rb = statistics.median(times[base]["fit"]), statistics.median(times[base]["run"])
        print(f"| {way} | {f:.1f} | {r:.1f} | {f / fb:.2f} | {r / rb:.2f} |")


if __name__ == "__main__":
    main()
