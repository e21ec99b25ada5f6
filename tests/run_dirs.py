"""What a Ray Train run directory says about its checkpoints, read the way a restart reads it."""
from __future__ import annotations

import json
from pathlib import Path


def committed(run_dir: Path) -> list[str]:
    """The checkpoint directories Ray's checkpoint manager has committed, oldest first (what a restart resumes
    from); [] before the first commit, or while Ray rewrites its snapshot."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    try:
        state = json.loads(snapshot.read_text())
    except json.JSONDecodeError:
        return []
    return [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]


def mid_epoch_committed(run_dir: Path, after_epochs: int) -> bool:
    """Whether a step checkpoint after `after_epochs` whole epochs (inside the next one) is committed."""
    return any(n.startswith(f"checkpoint_epoch{after_epochs:04d}_step") for n in committed(run_dir))
