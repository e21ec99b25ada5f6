"""What a run returns, the results table, and reading past runs back from MLflow."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacorrect.platform.tracking import resolve_tracking_uri, ui_command

TABLE_COLUMNS = (
    ("method", "method", "{}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_at_best_val", "test@best val", "{:.4f}"),
    ("val_accuracy", "val acc", "{:.4f}"),
    ("noisy_recovery", "noisy: pred=true", "{:.4f}"),
    ("noisy_fit_given", "noisy: pred=noisy label", "{:.4f}"),
    ("epoch", "epochs", "{:.0f}"),
    ("wall_s", "time s", "{:.0f}"),
)


@dataclass
class RunResult:
    """What `metacorrect.run` returns: the last epoch's metrics, the per-epoch history and where the run lives
    (its MLflow run id and tracking URI, its latest checkpoint, its run directory and data set)."""

    run_name: str
    method: str
    metrics: dict[str, float]  # the last epoch's metrics
    history: list[dict[str, float]]  # one row per epoch
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str | None  # latest checkpoint (state.pt + model.pt inside)
    run_dir: str  # Ray Train storage of this run: a new run with the same name resumes from here
    data_dir: str
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"method": self.method, **self.metrics, "wall_s": self.wall_s}

    def __str__(self) -> str:
        return format_table([self]) + "\n" + where(self.tracking_uri, self.mlflow_run_id)


def format_table(results: list[RunResult]) -> str:
    rows = [r.row() for r in results]
    cells = [[label for _, label, _ in TABLE_COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def agreement(a: RunResult, b: RunResult) -> dict[str, float]:
    """How far two runs of the same experiment ended apart (e.g. 1 vs 2 workers, CPU vs GPU): the absolute
    difference of their final test and validation accuracy, of their corrected labels' accuracy (label-correcting
    methods) and of their mean weights of clean and of corrupted samples (reweighting methods); the share of
    noisy ids whose corrected label is the same, and the correlation of their per-sample weights."""
    import numpy as np
    import pyarrow.parquet as pq

    from metacorrect.platform.checkpoint import CORRECTED_FILE, WEIGHTS_FILE

    out = {f"{k}_diff": abs(a.metrics[k] - b.metrics[k])
           for k in ("test_accuracy", "val_accuracy", "corrected_accuracy", "weight_mean_clean", "weight_mean_corrupted")
           if k in a.metrics and k in b.metrics}
    for name, column, key in ((CORRECTED_FILE, "corrected_label", "label_agreement"),
                              (WEIGHTS_FILE, "weight", "weight_correlation")):
        files = [Path(r.checkpoint_path or "") / name for r in (a, b)]
        if not all(f.is_file() for f in files):
            continue
        x, y = (pq.read_table(f, columns=["id", column]).to_pandas().sort_values("id")[column].to_numpy()
                for f in files)
        out[key] = float(np.mean(x == y)) if key == "label_agreement" else float(np.corrcoef(x, y)[0, 1])
    return out


def where(tracking_uri: str, run_id: str | None = None) -> str:
    text = f"MLflow runs: {tracking_uri}\n  open them with: {ui_command(tracking_uri)}"
    if run_id:  # the experiment's runs table with the researcher's columns (docs/mlflow.md)
        from metacorrect.platform.tracking import runs_table_url

        try:
            text += f"\n  runs table: {runs_table_url(tracking_uri, run_id)}"
        except Exception:  # noqa: BLE001 - a store no longer reachable: the two lines above still hold
            pass
    return text


def load_results(experiment: str = "metacorrect", tracking_uri: str | None = None):
    """All runs of an experiment as a pandas DataFrame (columns `params.*`, `metrics.*`, `tags.*`), newest
    first."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])
