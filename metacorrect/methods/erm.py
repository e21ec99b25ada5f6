"""Baselines without meta-learning: `erm` trains on noisy + clean labels, `clean_only` on the clean set alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from metacorrect.methods.base import Batch, Method, MethodConfig


@dataclass
class ERMConfig(MethodConfig):
    name: str = "erm"
    use_clean: bool = True  # add the clean batch to every step (the usual "ERM on all labels" baseline)

    search_space: ClassVar[dict[str, Any]] = {"optim.lr": {"loguniform": [0.005, 0.2]},
                                              "optim.weight_decay": {"loguniform": [1e-5, 1e-3]}}


@dataclass
class CleanOnlyConfig(MethodConfig):
    name: str = "clean_only"

    search_space: ClassVar[dict[str, Any]] = ERMConfig.search_space


class ERM(Method, name="erm", config=ERMConfig):
    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        parts = [b for b in (noisy, clean if self.mcfg.use_clean else None) if b is not None and b.weight > 0]
        if not parts:  # a stand-in noisy batch without clean data: contribute nothing, still join the all-reduce
            parts = [noisy]
        x = torch.cat([b.x for b in parts])
        y = torch.cat([b.label for b in parts])
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer_step(loss, sum(b.weight for b in parts))
        return {"train_loss": loss.item()}


class CleanOnly(Method, name="clean_only", config=CleanOnlyConfig):
    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        # The noisy stream only paces the epoch, so epochs mean the same number of steps for every method.
        loss = F.cross_entropy(self.model(clean.x), clean.label)
        self.optimizer_step(loss, clean.weight if noisy.weight > 0 else 0.0)
        return {"train_loss": loss.item()}
