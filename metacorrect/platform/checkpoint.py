"""What a checkpoint holds (model, optimizer, scheduler, method state, position) and how it is read back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
STEPS_FILE = "step_history.json"  # the step metrics rows (train.log_every) of the whole run


CORRECTED_FILE = "corrected_labels.parquet"
EXPORTS_FILE = "method_exports.json"  # names of the files the method exported (Method.export_files)
WEIGHTS_FILE = "sample_weights.parquet"
LABEL_TRANSITION_FILE = "label_transition.json"


def write_state(directory: Path, state: dict[str, Any], extras: dict[str, bytes] | None = None) -> None:
    """`state` and `extras` (further files, name -> content, that belong with this checkpoint) into `directory`."""
    for name, content in (extras or {}).items():
        (directory / name).write_bytes(content)
    torch.save(state, directory / STATE_FILE)
    # The bare student weights beside the full state: what users load for inference.
    torch.save(state["model"], directory / MODEL_FILE)
    # Per-epoch metrics of the whole run (also across resumes), readable without unpickling tensors.
    (directory / HISTORY_FILE).write_text(json.dumps(state["history"]))
    (directory / STEPS_FILE).write_text(json.dumps(state.get("step_history", [])))


def load_state(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=False)


def corrected_labels_parquet(rows: dict[str, Any]) -> bytes:
    """The corrected soft labels of the whole noisy set, one row per noisy id, sorted by id."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    order = rows["id"].argsort()
    table = pa.table({"id": rows["id"][order].cpu().numpy(),
                      "noisy_label": rows["noisy_label"][order].cpu().numpy().astype("int16"),
                      "corrected_label": rows["corrected_label"][order].cpu().numpy().astype("int16"),
                      "confidence": rows["confidence"][order].cpu().numpy()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def sample_weights_parquet(weights: Any) -> bytes:
    """A reweighting method's weight of every noisy id (sorted by id) and whether its label is corrupted."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = weights.rows
    order = rows["id"].argsort()
    table = pa.table({"id": rows["id"][order].cpu().numpy(),
                      "noisy_label": rows["noisy_label"][order].cpu().numpy().astype("int16"),
                      "weight": rows["weight"][order].cpu().numpy(),
                      "corrupted": rows["corrupted"][order].cpu().numpy().astype(bool)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def load_history(directory: str | Path) -> list[dict[str, float]]:
    path = Path(directory) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def load_step_history(directory: str | Path) -> list[dict[str, float]]:
    path = Path(directory) / STEPS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def prune(root: str | Path, keep: int = 2, prefix: str = "checkpoint_epoch") -> None:
    """Keep the newest `keep` checkpoints written under `root` (local mode, where Ray copies nothing)."""
    for old in sorted(Path(root).glob(f"{prefix}*"))[:-keep]:
        discard(old)
