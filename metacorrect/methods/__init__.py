"""The methods room: method name -> Method class (which names its config dataclass).

File map (docs/design.md): `base.py` (the interface, MethodConfig, the constructor context, shared helpers),
`table.py` (the per-sample table), `backbones.py` (the students), `engine/` (the meta-gradient machinery, no
method names), and one file per method that imports only those.
"""
from __future__ import annotations

from metacorrect.methods.base import Batch, Method, MethodConfig, MethodContext
from metacorrect.methods.emlc import EMLC
from metacorrect.methods.erm import ERM, CleanOnly
from metacorrect.methods.ieg import IEG
from metacorrect.methods.l2rw import L2RW
from metacorrect.methods.mlc import MLC
from metacorrect.methods.mslg import MSLG
from metacorrect.methods.mwnet import MWNet
from metacorrect.methods.soft_labels import SoftLabels

METHODS: dict[str, type[Method]] = {m.name: m for m in (ERM, CleanOnly, MLC, EMLC, MSLG, SoftLabels, IEG, MWNet, L2RW)}

__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "MethodContext"]
