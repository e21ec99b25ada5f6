"""Accuracy of every method on digits over several seeds: the figures behind the accuracy tables of docs/benchmarks.md and
the margins that the end-to-end tests assert on one seed.

Each method runs its digits config (`configs/digits_*.yaml`) on the same prepared data (digits, 10 clean and 20
validation images per class, data seed 0) with train.seed 0..S-1, the loop in the driver, a fixed block order.
Printed per noise setting and method: test accuracy at the best validation epoch, mean ± std over the seeds,
its minimum, and its smallest margin over `erm` and over `clean_only` (the same seed's run); for label-correcting
methods the accuracy of the corrected labels. A second table gives the worst seed of each other quantity the
end-to-end tests bound: the corrected labels' accuracy (on all noisy rows and on the corrupted ones), how much the
corrupted rows' accuracy grew from the first epoch to the last, and IEG's EMA model's test accuracy. Selection is
on validation only: to compare settings of a method (`--set`, applied to every method but the baselines), read the
best validation accuracy column, not the test columns.

    python benchmarks/digits_accuracy.py                                   # the tests' settings, 5 seeds
    python benchmarks/digits_accuracy.py --seeds 3 --epochs 25 --settings sym60 --methods erm,clean_only,mlc,emlc
    python benchmarks/digits_accuracy.py --seeds 10 --settings sym60 --methods mslg --set method.label_lr=4000
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
from metacorrect.datasets.prepare import prepare  # noqa: E402
from metacorrect.platform.trainer import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("erm", "clean_only")
SETTINGS = {"sym60": "symmetric:0.6", "sym40": "symmetric:0.4", "pair40": "pair:0.4"}
# What the end-to-end tests run (tests/test_methods_e2e.py and friends): every method on 60% symmetric noise,
# the label methods also on 40%, IEG also on 40% pair noise; the baselines wherever a method is compared.
PLAN = {"sym60": ("erm", "clean_only", "mlc", "emlc", "mslg", "soft_labels", "ieg", "mwnet", "l2rw"),
        "sym40": ("erm", "clean_only", "mslg", "soft_labels"), "pair40": ("erm", "clean_only", "ieg")}

# Quantities the end-to-end tests assert a bound on (tests/test_methods_e2e.py, test_label_methods_e2e.py,
# test_methods_reweight_e2e.py): the corrected labels' accuracy, on all noisy rows and on the corrupted ones; how
# much the corrupted rows' accuracy grew from the first epoch to the last; the EMA model's final test accuracy.
CLAIMS = ("corrected_accuracy", "corrected_accuracy_corrupted", "corrupted_growth", "ema_test_accuracy")


def config_file(method: str) -> Path:
    return ROOT / "configs" / ("digits_demo.yaml" if method in ("erm", "clean_only") else f"digits_{method}.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15, help="one budget for every method (default 15)")
    parser.add_argument("--settings", default=",".join(PLAN), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--methods", help="comma-separated (default: the plan above per setting)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every method but erm and clean_only (repeatable)")
    args = parser.parse_args()
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="digits-accuracy-"))
    tables = []
    for setting in args.settings.split(","):
        data = work / setting
        prepare("digits", data, noise=SETTINGS[setting], clean_per_class=10, seed=0, progress=False)
        methods = args.methods.split(",") if args.methods else PLAN[setting]
        scores: dict[str, list[float]] = {}
        best_val: dict[str, list[float]] = {}
        asserted: dict[str, list[dict[str, float]]] = {}
        for method in methods:
            started = time.time()
            for seed in range(args.seeds):
                overrides = [f"data.path={data}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                             "resources.num_workers=0", "data.deterministic=true",
                             f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.storage_path={work / 'runs'}",
                             "tracking.experiment=digits-accuracy"] + (
                                 ["method.name=clean_only"] if method == "clean_only" else []) + (
                                 [] if method in BASELINES else args.set)
                result = run(ExperimentConfig.from_yaml(config_file(method), overrides), progress=False)
                scores.setdefault(method, []).append(result.metrics["test_at_best_val"])
                best_val.setdefault(method, []).append(max(h["val_accuracy"] for h in result.history))
                asserted.setdefault(method, []).append(_asserted(result))
            print(f"{setting} {method}: {[round(s, 3) for s in scores[method]]} ({time.time() - started:.0f} s)",
                  flush=True)
        tables.append((setting, scores, asserted, best_val))
    overrides = f" (with {' '.join(args.set)} for all but the baselines)" if args.set else ""
    print(f"\n{args.seeds} seeds (train.seed 0..{args.seeds - 1}), {args.epochs} epochs, test accuracy at the best "
          f"validation epoch{overrides}\n")
    print("| setting | method | mean ± std | min | min margin over erm | min margin over clean_only | "
          "corrected labels (mean) | best val: mean, min |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, scores, asserted, best_val in tables:
        for method, values in scores.items():
            margins = []
            for base in ("erm", "clean_only"):
                if base in scores and base != method:
                    margins.append(f"{min(v - b for v, b in zip(values, scores[base])):+.3f}")
                else:
                    margins.append("-")
            fixed = [r["corrected_accuracy"] for r in asserted[method] if "corrected_accuracy" in r]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| {setting} | {method} | {statistics.mean(values):.3f} ± {spread:.3f} | {min(values):.3f} | "
                  f"{margins[0]} | {margins[1]} | {f'{statistics.mean(fixed):.3f}' if fixed else '-'} | "
                  f"{statistics.mean(best_val[method]):.3f}, {min(best_val[method]):.3f} |")

    print(f"\nWhat the end-to-end tests assert on one seed, worst seed here: {', '.join(CLAIMS)}\n")
    print("| setting | method | " + " | ".join(CLAIMS) + " |")
    print("|---|---|" + "---|" * len(CLAIMS))
    for setting, _, asserted, _ in tables:
        for method, rows in asserted.items():
            cells = [f"{min(r[k] for r in rows):.3f}" if all(k in r for r in rows) else "-" for k in CLAIMS]
            print(f"| {setting} | {method} | " + " | ".join(cells) + " |")



def _asserted(result) -> dict[str, float]:
    out = {k: result.metrics[k] for k in CLAIMS if k in result.metrics}
    corrupted = [h["corrected_accuracy_corrupted"] for h in result.history if "corrected_accuracy_corrupted" in h]
    if corrupted:
        out["corrupted_growth"] = corrupted[-1] - corrupted[0]
    return out


if __name__ == "__main__":
    main()
