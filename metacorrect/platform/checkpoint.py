"""What a checkpoint holds (model, optimizer, scheduler, method state, position) and how it is read back."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"


def save_state(state: dict[str, Any]) -> Path:
    """Write into a fresh temporary directory (Ray copies it to storage; the caller deletes it after)."""
    directory = Path(tempfile.mkdtemp(prefix="metacorrect-ckpt-"))
    torch.save(state, directory / STATE_FILE)
    # The bare student weights beside the full state: what users load for inference.
    torch.save(state["model"], directory / MODEL_FILE)
    # Per-epoch metrics of the whole run (also across resumes), readable without unpickling tensors.
    (directory / HISTORY_FILE).write_text(json.dumps(state["history"]))
    return directory


def load_state(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=False)


def load_history(directory: str | Path) -> list[dict[str, float]]:
    path = Path(directory) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
