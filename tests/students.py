"""Tiny students with a method attached, built the same way by every method test, and their checkpoint round trip."""
from __future__ import annotations

import io
from typing import Any

import torch

from metacorrect.config import ExperimentConfig
from metacorrect.methods import METHODS
from metacorrect.methods.base import Method, MethodContext
from metacorrect.methods.backbones import build_backbone
from metacorrect.platform.collective import Collective


def make_method(fields: dict[str, Any], *, classes: int, side: int, width: int, num_noisy: int,
                arch: str = "small_cnn", seed: int = 0, lr: float = 0.1, weight_decay: float = 5e-4,
                collective: Collective | None = None) -> Method:
    """`fields` (with "name") on a fresh `arch` student (side x side x 1 images) and SGD with momentum 0.9,
    seeded by `seed`, on one worker unless `collective` says otherwise."""
    cfg = ExperimentConfig.from_dict({"method": fields, "model": {"arch": arch, "width": width}})
    torch.manual_seed(seed)
    model = build_backbone(arch, classes, (side, side, 1), width)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    return METHODS[fields["name"]](MethodContext(cfg, model, opt, classes, num_noisy, collective or Collective()))


def restore(source: Method, target: Method) -> Method:
    """`target` given `source`'s model, optimizer and method state through a serialised checkpoint (as a
    resumed run gets them); `target` should start from other weights, so nothing survives by accident."""
    buf = io.BytesIO()
    torch.save({"model": source.model.state_dict(), "optimizer": source.optimizer.state_dict(),
                "method": source.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    target.model.load_state_dict(state["model"])
    target.optimizer.load_state_dict(state["optimizer"])
    target.load_state_dict(state["method"])
    return target
