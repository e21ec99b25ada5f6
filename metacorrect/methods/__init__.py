"""Method registry: name -> Method class (which names its config dataclass)."""
from __future__ import annotations

from metacorrect.methods.base import Batch, Method
from metacorrect.methods.erm import ERM, CleanOnly

METHODS: dict[str, type[Method]] = {m.name: m for m in (ERM, CleanOnly)}

__all__ = ["METHODS", "Batch", "Method"]
