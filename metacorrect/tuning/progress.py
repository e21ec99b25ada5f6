"""One console line per trial event of a sweep (a Tune callback, so it runs in the sweep's driver)."""
from __future__ import annotations

from typing import Any

from ray import tune


class SweepProgress(tune.Callback):
    def __init__(self, metric: str, mode: str, epochs: int, num_trials: int, searched: list[str],
                 enabled: bool = True):
        self.metric, self.mode, self.epochs, self.num_trials = metric, mode, epochs, num_trials
        self.searched, self.enabled = searched, enabled
        self.best: tuple[float, str] | None = None  # (value, trial id)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        self._print(f"trial {trial.trial_id} started ({len(trials)}/{self.num_trials} created, {done} done): "
                    f"{format_params(trial.config, self.searched)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if value is None:
            return
        if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
            self.best = (value, trial.trial_id)
        self._print(f"trial {trial.trial_id} epoch {int(result.get('epoch', 0))}/{self.epochs}  "
                    f"{self.metric} {value:.4f}  (best so far {self.best[0]:.4f}, trial {self.best[1]})")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        value = last.get(self.metric)
        how = "finished" if epoch >= self.epochs else f"stopped early by the scheduler at epoch {epoch}/{self.epochs}"
        shown = f", {self.metric} {value:.4f}" if value is not None else ""
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + (trial.status not in ("TERMINATED", "ERROR"))
        self._print(f"trial {trial.trial_id} {how}{shown}  [{done}/{self.num_trials} done]")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        error = getattr(trial, "error_file", None) or ""
        self._print(f"trial {trial.trial_id} FAILED{' (details: ' + error + ')' if error else ''}")

    def _print(self, line: str) -> None:
        if self.enabled:
            print(f"[sweep] {line}", flush=True)


def format_params(config: dict[str, Any], searched: list[str]) -> str:
    parts = []
    for key in searched:
        value = config.get(key)
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)
