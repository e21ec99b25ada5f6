"""A suite's leaderboard, read from its MLflow child runs: mean ± std over seeds per (method, setting).

Tables: test accuracy at the best validation epoch (the headline; with each method's mean wall time per
trial), final-epoch test accuracy, corrected-label accuracy (methods that correct labels). The best mean of
each column is marked (bold in Markdown). Stds are sample stds (n - 1) over the seeds that finished.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

# (metric in MLflow, title of its table)
TABLES = (("test_at_best_val", "test accuracy at the best validation epoch"),
          ("test_accuracy", "test accuracy at the final epoch"),
          ("corrected_accuracy", "corrected-label accuracy on the noisy training set (label-correcting methods)"))
CSV_COLUMNS = ("method", "setting", "seeds", "test_at_best_val_mean", "test_at_best_val_std", "test_accuracy_mean",
               "test_accuracy_std", "corrected_accuracy_mean", "corrected_accuracy_std", "wall_s_mean")


@dataclass
class Leaderboard:
    name: str
    trials: Any  # pandas DataFrame: one row per finished child run (method, setting, seed, metrics, run id)
    methods: list[str]  # rows, in the suite's order
    settings: list[str]  # columns, in the suite's order
    noise_rates: dict[str, float] = field(default_factory=dict)  # setting -> rate
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its explicit overrides
    budget: str = ""
    num_trials: int = 0  # planned

    def summary(self):
        """One row per (method, setting): seeds, mean and std of every metric, mean wall time."""
        import pandas as pd

        rows = []
        for method in self.methods:
            for setting in self.settings:
                part = self.trials[(self.trials["method"] == method) & (self.trials["setting"] == setting)]
                row: dict[str, Any] = {"method": method, "setting": setting, "seeds": len(part)}
                for metric, _ in TABLES:
                    values = part[metric].dropna() if metric in part else []
                    row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
                    row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
                row["wall_s_mean"] = float(part["wall_s"].mean()) if len(part) else math.nan
                rows.append(row)
        return pd.DataFrame(rows, columns=list(CSV_COLUMNS))

    def to_csv(self) -> str:
        return self.summary().to_csv(index=False)

    def to_markdown(self) -> str:
        summary = self.summary()
        seeds = sorted(set(int(s) for s in self.trials["seed"])) if len(self.trials) else []
        out = [f"## {self.name}: mean ± std over {len(seeds)} seed(s) {seeds}; best per column in bold"]
        if self.budget:
            out.append(f"budget shared by every method: {self.budget}")
        for metric, title in TABLES:
            table = summary[summary[f"{metric}_mean"].notna()]
            if not len(table):
                continue
            headline = metric == TABLES[0][0]
            columns = list(self.settings) + (["s / trial"] if headline else [])
            lines = ["", f"### {title}", "", "| method | " + " | ".join(columns) + " |",
                     "|:--|" + "--:|" * len(columns)]
            best = {s: table[table["setting"] == s][f"{metric}_mean"].max() for s in self.settings}
            for method in [m for m in self.methods if m in set(table["method"])]:
                cells = []
                for setting in self.settings:
                    row = table[(table["method"] == method) & (table["setting"] == setting)]
                    if not len(row):
                        cells.append("-")
                        continue
                    r = row.iloc[0]
                    text = _mean_std(r[f"{metric}_mean"], r[f"{metric}_std"])
                    if r["seeds"] < len(seeds):
                        text += f" (n={int(r['seeds'])})"
                    cells.append(f"**{text}**" if r[f"{metric}_mean"] == best[setting] else text)
                if headline:
                    walls = summary[summary["method"] == method]["wall_s_mean"]
                    cells.append(f"{walls.mean():.0f}" if walls.notna().any() else "-")
                label = method + (" *" if self.overrides.get(method) else "")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            out += lines
        notes = [f"* {m}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in self.overrides.items() if o]
        if notes:
            out += ["", "per-method overrides (not the shared budget):", *notes]
        return "\n".join(out)


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def read_leaderboard(uri: str, parent_id: str):
    """The leaderboard of the suite whose MLflow parent run is `parent_id`, from its FINISHED child runs."""
    import pandas as pd

    from metacorrect.platform import tracking

    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    params = parent.data.params
    methods, settings = json.loads(params["bench.methods"]), json.loads(params["bench.settings"])
    seeds = json.loads(params["bench.seeds"])
    plan = json.loads(parent.data.tags.get("bench.plan", "{}"))
    finished = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"
    children = c.search_runs([parent.info.experiment_id], filter_string=finished, max_results=10000)
    rows = []
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({"method": tags.get("bench.method"), "setting": tags.get("bench.setting"),
                     "seed": int(tags.get("bench.seed", -1)), "label_digest": tags.get("bench.label_digest"),
                     **{m: metrics.get(m, math.nan) for m, _ in TABLES}, "wall_s": _bookkeeping(run, "wall_s"),
                     "epochs": _bookkeeping(run, "epoch"), "mlflow_run_id": run.info.run_id,
                     "run_name": run.info.run_name})
    trials = pd.DataFrame(rows, columns=["method", "setting", "seed", "label_digest", *(m for m, _ in TABLES),
                                         "wall_s", "epochs", "mlflow_run_id", "run_name"])
    trials = trials.sort_values(["method", "setting", "seed"], kind="stable").reset_index(drop=True)
    return Leaderboard(name=parent.info.run_name, trials=trials, methods=methods, settings=settings,
                       noise_rates=plan.get("noise_rates", {}), overrides=plan.get("overrides", {}),
                       budget=plan.get("budget", ""), num_trials=len(methods) * len(settings) * len(seeds))


def metric_key(metric: str, method: str, setting: str) -> str:
    """`test_at_best_val.METHOD.SETTING`, a cell as a metric of the parent run; characters MLflow refuses in a
    metric name (labels are free text, e.g. `mslg+clean`) become `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", f"{metric}.{method}.{setting}")


def log_leaderboard(uri: str, run_id: str, board: Leaderboard) -> None:
    """The leaderboard (CSV, Markdown), the trials table and the plots, as artifacts of the parent run."""
    from metacorrect.platform import tracking

    c = tracking.client(uri)
    c.log_text(run_id, board.to_csv(), "leaderboard.csv")
    c.log_text(run_id, board.to_markdown() + "\n", "leaderboard.md")
    c.log_text(run_id, board.trials.to_csv(index=False), "trials.csv")
    summary = board.summary()
    for metric, _ in TABLES[:1]:
        for _, row in summary.iterrows():
            if not math.isnan(row[f"{metric}_mean"]):
                c.log_metric(run_id, metric_key(metric, row["method"], row["setting"]), row[f"{metric}_mean"])
    for name, fig in plot_leaderboard(board).items():
        c.log_figure(run_id, fig, f"plots/{name}.png")
        fig.clear()
        import matplotlib.pyplot as plt

        plt.close(fig)


def plot_leaderboard(board: Leaderboard) -> dict[str, Any]:
    """test accuracy (at best val) vs noise rate per method, ± std bars; corrected-label accuracy per method."""
    import numpy as np

    from metacorrect.platform.plots import _pyplot

    plt = _pyplot()
    summary = board.summary()
    if not len(summary) or summary["test_at_best_val_mean"].isna().all():
        return {}
    rates = [board.noise_rates.get(s) for s in board.settings]
    by_rate = all(r is not None for r in rates) and len(set(rates)) == len(rates)
    xs = rates if by_rate else list(range(len(board.settings)))
    figs = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(board.methods):
        part = summary[summary["method"] == method].set_index("setting").reindex(board.settings)
        y, err = part["test_at_best_val_mean"].to_numpy(), np.nan_to_num(part["test_at_best_val_std"].to_numpy())
        if np.isnan(y).all():
            continue
        shift = (i - len(board.methods) / 2) * 0.002 if by_rate else (i - len(board.methods) / 2) * 0.04
        ax.errorbar(np.array(xs, dtype=float) + shift, y, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xlabel("noise rate" if by_rate else "setting")
    if not by_rate:
        ax.set_xticks(xs, board.settings)
    ax.set_ylabel("test accuracy at best val (mean ± std)")
    ax.set_title(f"{board.name}: test accuracy vs noise")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    figs["test_accuracy_vs_noise"] = fig
    corrected = summary[summary["corrected_accuracy_mean"].notna()]
    if len(corrected):
        methods = [m for m in board.methods if m in set(corrected["method"])]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        width = 0.8 / max(1, len(board.settings))
        for j, setting in enumerate(board.settings):
            part = corrected[corrected["setting"] == setting].set_index("method").reindex(methods)
            ax.bar(np.arange(len(methods)) + j * width, part["corrected_accuracy_mean"].to_numpy(), width,
                   yerr=np.nan_to_num(part["corrected_accuracy_std"].to_numpy()), capsize=3, label=setting)
        ax.set_xticks(np.arange(len(methods)) + width * (len(board.settings) - 1) / 2, methods)
        ax.set_ylabel("corrected-label accuracy (mean ± std)")
        ax.set_title(f"{board.name}: accuracy of the corrected labels")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs["corrected_accuracy"] = fig
    return figs


def plan_tag(spec) -> str:
    """What the leaderboard needs of the suite besides the child runs (a tag of the parent run)."""
    b = spec.base
    budget = (f"{b.train.epochs} epochs, {b.model.arch} width {b.model.width}, batch {b.train.batch_size} + "
              f"clean {b.train.clean_batch_size}, lr {b.optim.lr} {b.optim.schedule}")
    return json.dumps({"noise_rates": {s.label: s.noise_rate for s in spec.settings},
                       "overrides": {m.label: m.overrides for m in spec.methods if m.overrides}, "budget": budget})


def make_progress(num_trials: int, enabled: bool = True):
    from ray import tune

    class BenchProgress(tune.Callback):
        """One console line per finished (or failed) trial, with an ETA from the pace so far."""

        def __init__(self):
            self.started = time.time()
            self.done = 0

        def setup(self, **info: Any) -> None:
            # A resumed suite gets this object back from Tune's saved state, as it was when the suite began:
            # time and pace count from now, or the hours between the two would make the ETA days.
            self.started, self.done = time.time(), 0

        def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
            self.done += 1
            last = trial.last_result or {}
            score = last.get("test_at_best_val")
            shown = f"test@best val {score:.4f}, " if score is not None else ""
            elapsed = time.time() - self.started
            left = num_trials - sum(t.status in ("TERMINATED", "ERROR") for t in trials) - (
                trial.status not in ("TERMINATED", "ERROR"))
            eta = f", ETA {_duration(elapsed / self.done * left)}" if left > 0 else ""
            self._print(f"{trial.config.get('trial')} finished: {shown}{int(last.get('epoch', 0))} epochs  "
                        f"[{num_trials - left}/{num_trials} done, {_duration(elapsed)} elapsed{eta}]")

        def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
            self.done += 1
            error = getattr(trial, "error_file", None) or ""
            self._print(f"{trial.config.get('trial')} FAILED{' (details: ' + error + ')' if error else ''}")

        def _print(self, line: str) -> None:
            if enabled:
                print(f"[bench] {line}", flush=True)

    return BenchProgress()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _bookkeeping(run: Any, key: str) -> float:
    """A counter or timing of a finished run: a tag (`run_layout.BOOKKEEPING`); a metric in older records."""
    if key in run.data.tags:
        return float(run.data.tags[key])
    return run.data.metrics.get(key, math.nan)
