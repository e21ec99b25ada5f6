"""A run at scale on 2 Ray Train workers: steps lost to a killed worker, the noisy-set evaluation's share of
wall time with `train.eval_noisy: known` and `all`, and the memory of the driver and the workers (the table in
docs/benchmarks.md, "A run at scale").

Prepares (once) a synthetic set of --n images (64x64x3, 14 classes, 40% symmetric noise), then trains, per
row, --epochs epochs with `checkpoint_every` and `log_every`:
  - erm with eval_noisy all, and erm and one meta method (EMLC, k = 5) with eval_noisy known (at most 50,000
    rows measured);
  - in the rows marked "killed", one Ray Train worker is SIGKILLed by pid halfway through the first epoch;
  - the meta method's row trains --meta-epochs epochs (default 1, so its evaluation column is the final pass).
Printed per row: steps, steps lost (the last step the killed attempt trained minus the step it resumed from),
wall seconds, the share of the first epoch spent evaluating (epoch time minus training time; the last epoch
also makes the full pass for the exports), and the peak RSS of the driver and of the largest worker.

    python benchmarks/scale_run.py                      # 200,000 images, batch 256, 2 epochs
    python benchmarks/scale_run.py --n 50000 --method mslg --method-set method.warmup_epochs=0
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.config import ExperimentConfig  # noqa: E402
from metacorrect.datasets.prepare import prepare  # noqa: E402
from metacorrect.platform.memory import rss_bytes  # noqa: E402
from metacorrect.platform.trainer import run  # noqa: E402


def _workers(address: str) -> list[int]:
    from ray.util.state import list_actors

    try:
        return [a["pid"] for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                         ("state", "=", "ALIVE")])]
    except Exception:  # noqa: BLE001 - the state API between two runs: no workers to sample
        return []


def _trace_steps(trace: Path) -> tuple[int, int]:
    """(last step the first attempt traced, first step of the second attempt) from `trace_ids_dir`."""
    attempts: dict[int, list[int]] = {}
    for f in trace.glob("ids-rank*-pid*.jsonl"):
        steps = [json.loads(line)["step"] for line in f.read_text().splitlines()]
        if steps:
            attempts.setdefault(steps[0], []).extend(steps)
    first, second = (attempts[k] for k in sorted(attempts)[:2])
    return max(first), min(second)


def measure(base: list[str], method: str, eval_noisy: str, kill: bool, work: Path, steps_per_epoch: int,
            address: str, method_sets: list[str] = ()) -> dict:
    name = f"{method}-{eval_noisy}-{'killed' if kill else 'whole'}"
    trace = work / "trace" / name
    cfg = ExperimentConfig.from_dict({"method": {"name": method}}).with_overrides(
        base + [f"train.eval_noisy={eval_noisy}", f"tracking.run_name={name}", f"train.trace_ids_dir={trace}"]
        + list(method_sets))
    outcome, peaks = {}, {"driver": 0, "worker": 0}
    driver = threading.Thread(target=lambda: outcome.update(result=run(cfg, progress=False)), daemon=True)
    started = time.time()
    driver.start()
    killed = False
    while driver.is_alive():
        peaks["driver"] = max(peaks["driver"], rss_bytes())
        pids = _workers(address)
        peaks["worker"] = max([peaks["worker"]] + [rss_bytes(p) for p in pids])
        if kill and not killed and pids:
            done = max((len(f.read_text().splitlines()) for f in trace.glob("ids-rank0-*.jsonl")), default=0)
            if done >= steps_per_epoch // 2:  # halfway through the first epoch
                os.kill(pids[-1], signal.SIGKILL)
                killed = True
        time.sleep(0.5)
    driver.join()
    if "result" not in outcome:
        sys.exit(f"scale_run: the run {name} failed (see the log above)")
    result = outcome["result"]
    first = result.history[0]
    train_s = first["noisy_rows_seen"] / first["train_samples_per_s"]
    lost = None
    if kill:
        last, resumed = _trace_steps(trace)
        lost = last - (resumed - 1)
    return {"row": name, "steps": sum(int(h["steps"]) for h in result.history), "lost": lost,
            "wall_s": time.time() - started, "eval_s": first["epoch_time_s"] - train_s, "train_s": train_s,
            "last_eval_s": result.history[-1]["epoch_time_s"] - result.history[-1]["noisy_rows_seen"]
            / result.history[-1]["train_samples_per_s"],
            "driver_mib": peaks["driver"] / 2**20, "worker_mib": peaks["worker"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--data", default=None, help="a prepared data set to reuse (default: prepared under /tmp)")
    parser.add_argument("--method", default="emlc", help="the meta method of the last row")
    parser.add_argument("--method-set", action="append", default=None,
                        help="a field of the meta method (repeatable; default for emlc: method.k=5, its k-step "
                             "look-ahead)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--meta-epochs", type=int, default=1,
                        help="epochs of the meta method's row (1: its evaluation column is the final full pass)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    if args.method_set is None:
        args.method_set = ["method.k=5"] if args.method == "emlc" else []
    os.environ.setdefault("RAY_ADDRESS", "local")
    work = Path(tempfile.mkdtemp(prefix="scale-run-"))
    data = Path(args.data) if args.data else Path(f"/tmp/scale-run-syn{args.n}")
    if not data.exists():
        prepare("synthetic", data, noise="symmetric:0.4", options={"n": args.n, "num_classes": 14, "image_size": 64},
                progress=True)
    meta = json.loads((data / "meta.json").read_text())
    noisy = meta["counts"]["noisy_train"]
    steps_per_epoch = -(-noisy // args.batch)
    base = [f"data.path={data}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
            f"train.checkpoint_every={args.checkpoint_every}", "train.log_every=10", f"model.width={args.width}",
            "resources.num_workers=2", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"tracking.storage_path={work / 'runs'}", "tracking.experiment=scale-run",
            "tracking.system_metrics_interval_s=2"]
    import ray

    from metacorrect.platform.cluster import ensure_ray

    ensure_ray()
    address = ray.get_runtime_context().gcs_address
    rows = [measure(base, "erm", "all", False, work, steps_per_epoch, address),
            measure(base, "erm", "known", True, work, steps_per_epoch, address),
            measure(base + [f"train.epochs={args.meta_epochs}"], args.method, "known", True, work, steps_per_epoch,
                    address, args.method_set)]
    print(f"\n# {noisy:,} noisy images of {args.n:,} (64x64x3 JPEG, 14 classes), batch {args.batch}, "
          f"{steps_per_epoch} steps an epoch, {args.epochs} epochs, checkpoint_every {args.checkpoint_every}, "
          f"2 workers, small_cnn width {args.width}; {time.strftime('%Y-%m-%d')}")
    # The share of an epoch spent evaluating, against a whole epoch's training (a killed epoch trained part).
    full_train = rows[0]["train_s"]  # the first row's first epoch trains whole
    print("| run | steps | steps lost to the kill | wall s | epoch 1: evaluation s (share of a whole epoch) | "
          "last epoch: evaluation + export s | peak RSS driver MiB | peak RSS worker MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lost = "-" if r["lost"] is None else str(r["lost"])
        share = r["eval_s"] / (full_train + r["eval_s"]) if r["row"].startswith("erm") else None
        print(f"| {r['row']} | {r['steps']} | {lost} | {r['wall_s']:.0f} | {r['eval_s']:.0f}"
              + (f" ({share:.0%})" if share is not None else "") + f" | {r['last_eval_s']:.0f} | "
              f"{r['driver_mib']:.0f} | {r['worker_mib']:.0f} |")


if __name__ == "__main__":
    main()
