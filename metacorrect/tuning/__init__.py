"""Ray Tune sweeps: search spaces (`space.py`), the trial = one Ray Train run (`trial.py`), the driver (`sweep.py`)."""
from metacorrect.tuning.space import default_space, load_space
from metacorrect.tuning.sweep import SweepResult, sweep

__all__ = ["SweepResult", "default_space", "load_space", "sweep"]
