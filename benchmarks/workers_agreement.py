"""Two workers against one, for every method, measured against run-to-run noise (the bounds of
tests/test_workers_e2e.py come from this table).

For each method: runs on one worker (the loop in the driver) with train.seed 0..S-1, and on two Ray Train
workers with the same seeds. Printed per method: the largest difference between two one-worker runs of
different seeds (run-to-run noise), and the largest difference between a two-worker run and the one-worker run
of the same seed; for test accuracy, the corrected labels' agreement (label-correcting methods) and the
per-sample weights' correlation (reweighting methods). Two workers compute what one would if the second
column stays within the first.

    python benchmarks/workers_agreement.py                        # every method, 3 seeds, 4 epochs, width 16
    python benchmarks/workers_agreement.py --methods mslg --seeds 5
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.config import ExperimentConfig  # noqa: E402
from metacorrect.datasets.prepare import prepare  # noqa: E402
from metacorrect.methods import METHODS  # noqa: E402
from metacorrect.platform.results import agreement  # noqa: E402
from metacorrect.platform.trainer import run  # noqa: E402

from digits_accuracy import config_file  # noqa: E402  (this folder: the digits config of each method)

# Settings the test uses too: few epochs and a narrow model, with the label methods' steps raised (and MSLG's
# warm-up shortened) so that their label tables move within those epochs (at the digits configs' own label
# learning rates they start moving after ~8 epochs).
EXTRA = {"mslg": ["method.warmup_epochs=1", "method.label_lr=20000"], "soft_labels": ["method.label_lr=10000"]}


def method_overrides(method: str, common: list[str]) -> list[str]:
    return common + (["method.name=clean_only"] if method == "clean_only" else []) + EXTRA.get(method, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workers-agreement-"))
    data = work / "digits-sym60"
    prepare("digits", data, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    common = [f"data.path={data}", f"train.epochs={args.epochs}", f"model.width={args.width}",
              f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.storage_path={work / 'runs'}",
              "tracking.experiment=workers-agreement"]
    keys = ("test_accuracy_diff", "corrected_accuracy_diff", "weight_mean_clean_diff", "weight_mean_corrupted_diff")
    rows = []
    for method in args.methods.split(","):
        started = time.time()
        base = method_overrides(method, common)
        one, two = {}, {}
        for seed in range(args.seeds):
            cfg = ExperimentConfig.from_yaml(config_file(method), base + [f"train.seed={seed}"])
            one[seed] = run(cfg.with_overrides(["resources.num_workers=0", "data.deterministic=true"]), progress=False)
            two[seed] = run(cfg.with_overrides(["resources.num_workers=2"]), progress=False)
        noise = [agreement(one[a], one[b]) for a, b in itertools.combinations(range(args.seeds), 2)]
        workers = [agreement(two[s], one[s]) for s in range(args.seeds)]
        row = {"method": method, "1w test": sum(r.metrics["test_accuracy"] for r in one.values()) / args.seeds,
               "2w test": sum(r.metrics["test_accuracy"] for r in two.values()) / args.seeds,
               "s": time.time() - started}
        for key in keys:
            worst = max if key.endswith("diff") else min
            if key in noise[0]:
                row[f"{key} seeds"] = worst(r[key] for r in noise)
                row[f"{key} 2w"] = worst(r[key] for r in workers)
        rows.append(row)
        print(row, flush=True)
    columns = ["method", "1w test", "2w test"] + [f"{k} {w}" for k in keys for w in ("seeds", "2w")]
    print(f"\n{args.seeds} seeds, {args.epochs} epochs, width {args.width}; worst case over seeds / seed pairs "
          f"(|diff|: largest; agreement, correlation: smallest)\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row["method"] if c == "method" else (f"{row[c]:.3f}" if c in row else "-")
                                for c in columns) + " |")


if __name__ == "__main__":
    main()
