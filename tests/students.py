"""Tiny students with a method attached, built the same way by every method test; the batches, the flat
views and the checkpoint round trip those tests share."""
from __future__ import annotations

import io
from typing import Any

import torch

from metacorrect.config import ExperimentConfig
from metacorrect.methods import METHODS
from metacorrect.methods.backbones import build_backbone
from metacorrect.methods.base import Batch, Method, MethodContext
from metacorrect.platform.collective import Collective
from metacorrect.platform.precision import step_precision


def make_method(fields: dict[str, Any], *, classes: int, side: int, width: int, num_noisy: int,
                arch: str = "small_cnn", seed: int = 0, lr: float = 0.1, weight_decay: float = 5e-4,
                collective: Collective | None = None, precision: str = "fp32") -> Method:
    """`fields` (with "name") on a fresh `arch` student (side x side x 1 images) and SGD with momentum 0.9,
    seeded by `seed`, on one worker unless `collective` says otherwise; `precision` is `train.precision` (fp16
    switches the method's loss scales on; the steps' autocast is the caller's)."""
    cfg = ExperimentConfig.from_dict({"method": fields, "model": {"arch": arch, "width": width},
                                      "train": {"precision": precision}})
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
                "method": source.state_dict(), "loss_scales": source.loss_scales.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    target.model.load_state_dict(state["model"])
    target.optimizer.load_state_dict(state["optimizer"])
    target.load_state_dict(state["method"])
    target.loss_scales.load_state_dict(state["loss_scales"])
    return target


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def noisy_and_clean(seed: int, steps: int, *, classes: int, side: int, num_noisy: int, n: int = 16, m: int = 8,
                    views: int = 0, noisy_weight: float | None = None) -> list[tuple[Batch, Batch]]:
    """`steps` (noisy, clean) pairs: disjoint noisy ids within a step, ids revisited across steps, `views`
    extra views per noisy image (IEG's strong views)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randperm(num_noisy, generator=g)[:n]
        x = torch.randn(n, 1, side, side, generator=g)
        extra = torch.randn(views, n, 1, side, side, generator=g) if views else None
        noisy = Batch(ids, x, torch.randint(0, classes, (n,), generator=g),
                      float(n) if noisy_weight is None else noisy_weight, views=extra)
        clean = Batch(torch.arange(m), torch.randn(m, 1, side, side, generator=g),
                      torch.randint(0, classes, (m,), generator=g), float(m))
        out.append((noisy, clean))
    return out


def run_steps(method: Method, data: list[tuple[Batch, Batch]], seed: int = 123) -> list[dict[str, float]]:
    """One step per pair, the global generator seeded before each (EMLC's corruption, IEG's MixUp draw)."""
    outs = []
    for i, (noisy, clean) in enumerate(data):
        torch.manual_seed(seed + i)
        outs.append(method.step(noisy, clean))
    return outs


def learned_state(method: Method) -> torch.Tensor:
    """Everything a method has learned, flat: the student, its meta-model, its table, its class α, its EMA."""
    parts = [flat(method.model.parameters())]
    if getattr(method, "meta_params", None):
        parts.append(flat(method.meta_params))
    if method.table is not None:
        parts.append(method.table.values.nan_to_num(-1.0).reshape(-1))
    if getattr(method, "alpha", None) is not None:
        parts.append(method.alpha.detach().reshape(-1))
    if getattr(method, "ema", None) is not None:
        parts.append(flat(method.ema.parameters()))
    return torch.cat([p.to(torch.float64) for p in parts])


def low_loss_scales(method: Method) -> None:
    """fp16 loss scales that the tiny students' first steps do not overflow (GradScaler's 2^16 does now and
    then: those first steps would be skipped, and comparisons with fp32 or with one worker be about skipping)."""
    state = method.loss_scales.state_dict()
    state["real"]["scale"] = 2.0 ** 10
    state["meta"]["grad"]["value"] = 2.0 ** 10
    method.loss_scales.load_state_dict(state)


def run_fp16_steps(method: Method, data: list[tuple[Batch, Batch]], seed: int = 123) -> list[dict[str, float]]:
    """`run_steps` under fp16 autocast on the CPU."""
    outs = []
    for i, (noisy, clean) in enumerate(data):
        torch.manual_seed(seed + i)
        with step_precision("fp16", "cpu"):
            outs.append(method.step(noisy, clean))
    return outs
