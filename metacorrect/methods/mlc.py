"""MLC — Meta Label Correction (Zheng, Awadallah & Dumais, AAAI'21; docs/methods/mlc.md).

A label correction network (LCN) g_α(h(x), ỹ) turns the student's stop-gradient penultimate features and
the noisy label into a soft label; the student trains on it (plus half of each clean batch with its hard
labels), and α follows the clean loss of the student after a k-step look-ahead.

Per iteration (real step first: `engine.MetaGradEngine`; docs/methods/mlc.md)::

    h = student.features(x_noisy)                        # one forward gives logits and the LCN input
    y_c = LCN(h.detach(), ỹ)                              # context (h, ỹ) is recorded with the snapshot
    engine.record(...) ; student SGD step on (n_s·softCE(y_c) + n_c·CE(clean half)) / (n_s + n_c)
    engine.meta_backward(other clean half)               # meta-gradient into the LCN's .grad
    every k-th call: Adam(amsgrad) step of the LCN

k = 1 uses the engine's one-step formula; k > 1 uses MLC's own accumulation by default (`discount: projection`,
Eq. 4–6, `step_hmlc_K`; at k = 1 the two are the same quantity), or EMLC's discount (`shrink`), or the
momentum-aware one (`momentum`, docs/k_step_discount.md).
The look-ahead lr is the optimizer's current lr (not MLC's `get_lr()`, which is 10× off at milestones).

Paper vs official code (both selectable):
- LCN hidden size: paper 64 for images (`hidden_dim: 64`, default); `microsoft/MLC` hard-codes 128.
- label embedding: paper (C, 128) (`embed_dim: 128`, default, = the official code's `cls_dim 128`; argparse default 64).
- k: paper Table 2 uses k = 5; the official code's `gradient_steps` default is 1 (default here: 1).
- skip connection (`skip: true`): arXiv v1 §3.1 / the official `--skip`, not in the AAAI paper; the author's
  advice for real noise (issue #6). `alpha: null` learns a per-sample α_i (an extra LCN output, as the code
  does); a number fixes α.
- The official code feeds the gold batch of size `bs` (its `--gold_bs` is unused); here the clean batch is
  train.clean_batch_size, split in half (`mix_clean`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.checks import UNIT_CLOSED, field_problems
from metacorrect.methods.base import (Batch, Capabilities, Method, MethodConfig, MethodContext, any_nonzero_grad,
                                      engine_discount, meta_problems, split_clean, student_loss)
from metacorrect.methods.engine import MetaGradEngine, frozen_running_stats, lower_loss


# ---- config and LCN -----------------------------------------------------------------------------------
DISCOUNTS = ("projection", "shrink", "momentum")


@dataclass
class MLCConfig(MethodConfig):
    name: str = "mlc"
    k: int = 1  # look-ahead steps (meta step every k iterations); paper Table 2: 5, official default: 1
    meta_grad: str = "fast"  # fast (JVP + VJP) | exact (double-backward reference)
    discount: str = "projection"  # k > 1: projection (the paper's Eq. 4–6) | shrink (EMLC's Π(1 − s)) | momentum
    meta_lr: float = 3e-4  # LCN optimizer: Adam(amsgrad=True, eps=1e-8); official Clothing1M: 3e-3
    meta_weight_decay: float = 0.0
    embed_dim: int = 128  # label embedding (C, 128) as in the paper (official argparse default 64)
    hidden_dim: int = 64  # LCN hidden size: paper 64 for images; official code hard-codes 128
    mix_clean: bool = True  # half of each clean batch joins the student's loss, half is the meta batch
    skip: bool = False  # y = α·onehot(ỹ) + (1−α)·g(h(x), ỹ) (official --skip; advised for real noise)
    alpha: float | None = None  # with skip: null = learned per-sample α (extra LCN output), else fixed α

    # Default sweep: the look-ahead k of the paper's ablation, the LCN's and the student's learning rates.
    search_space: ClassVar[dict[str, Any]] = {"method.k": {"choice": [1, 2, 5, 10]},
                                              "method.meta_lr": {"loguniform": [1e-4, 1e-2]},
                                              "optim.lr": {"loguniform": [0.005, 0.2]}}

    def validate(self) -> list[str]:
        return meta_problems(self, DISCOUNTS) + field_problems(
            "method", self, {"alpha": UNIT_CLOSED.or_null("a learned per-sample gate")})


class LCN(nn.Module):
    """The published LCN: Embedding(C, e) of ỹ, [h, e] -> Linear-Tanh-Linear-Tanh-Linear -> softmax."""

    def __init__(self, feature_dim: int, num_classes: int, embed_dim: int = 128, hidden_dim: int = 64,
                 skip: bool = False, alpha: float | None = None):
        super().__init__()
        self.num_classes, self.skip, self.alpha = num_classes, skip, alpha
        self.learned_gate = skip and alpha is None
        self.embedding = nn.Embedding(num_classes, embed_dim)
        self.net = nn.Sequential(
            nn.Linear(feature_dim + embed_dim, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, num_classes + (1 if self.learned_gate else 0)),
        )
        # Official init: Xavier-uniform embedding, Xavier-normal linears, zero biases.
        nn.init.xavier_uniform_(self.embedding.weight)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h: Tensor, noisy_label: Tensor) -> Tensor:
        out = self.net(torch.cat([h, self.embedding(noisy_label)], dim=1))
        if not self.skip:
            return F.softmax(out, dim=1)
        onehot = F.one_hot(noisy_label, self.num_classes).to(out.dtype)
        if self.learned_gate:
            a = torch.sigmoid(out[:, -1:])
            probs = F.softmax(out[:, :-1], dim=1)
        else:
            a = torch.full_like(out[:, :1], float(self.alpha))
            probs = F.softmax(out, dim=1)
        return a * onehot + (1.0 - a) * probs


def _features(model: nn.Module, x: Tensor) -> Tensor:
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise TypeError("mlc: the student must expose features(x) and classifier (a methods.backbones.Backbone)")
    return model.features(x)


# ---- the method ---------------------------------------------------------------------------------------
class MLC(Method, name="mlc", config=MLCConfig, capabilities=Capabilities(corrects_labels=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        m, model, collective = self.mcfg, self.model, self.collective
        p = next(model.parameters())
        feature_dim = int(getattr(model, "feature_dim", model.classifier.in_features))
        self.lcn = LCN(feature_dim, self.num_classes, m.embed_dim, m.hidden_dim, m.skip, m.alpha).to(p.device, p.dtype)
        collective.sync_module_(self.lcn)  # identical LCN on every worker
        self.meta_optimizer = torch.optim.Adam(self.lcn.parameters(), lr=m.meta_lr, amsgrad=True, eps=1e-8,
                                               weight_decay=m.meta_weight_decay)
        self.meta_params = [q for q in self.lcn.parameters() if q.requires_grad]
        self.engine = MetaGradEngine(model, self.optimizer, "soft_ce", k=m.k, meta_grad=m.meta_grad,
                                     discount=engine_discount(m.k, m.discount), collective=collective,
                                     meta_params=self.meta_params, loss_scale=self.loss_scales.meta)

    def _targets(self, context: tuple[Tensor, Tensor]) -> Tensor:
        h, noisy_label = context
        return self.lcn(h, noisy_label)

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        meta, train = split_clean(clean, self.mcfg.mix_clean)
        h = _features(self.model, noisy.x)
        logits = self.model.classifier(h)
        context = (h.detach(), noisy.label)
        with torch.no_grad():
            y_c = self._targets(context)
        clean_ce = F.cross_entropy(self.model(train.x), train.label) if train is not None else None
        soft = lower_loss("soft_ce", logits, y_c)
        loss, weight, scale = student_loss(soft, float(noisy.weight), clean_ce,
                                           train.weight if train is not None else 0.0)
        self.engine.record(noisy.x, context, weight=weight, scale=scale)
        if not self.optimizer_step(loss, weight):  # fp16 skipped the real step: it is no look-ahead
            self.engine.drop_last()

        out = {"train_loss": float(loss.detach()), "noisy_loss": float(soft.detach())}
        if clean_ce is not None:
            out["clean_loss"] = float(clean_ce.detach())
        if self.engine.ready:
            with self.meta_phase():
                self.meta_optimizer.zero_grad(set_to_none=True)  # MLC zeroes before every call (Eq. 4–6)
                result = self.engine.meta_backward(meta.x, meta.label, self._targets, clean_weight=meta.weight)
            out["meta_loss"] = result.meta_loss
            out.setdefault("clean_loss", result.meta_loss)
            if result.gamma is not None:
                out["meta_gamma"] = result.gamma
            if result.meta_step and any_nonzero_grad(self.meta_params):
                self.meta_optimizer.step()
        return out

    @torch.no_grad()
    def soft_labels(self, noisy: Batch) -> Tensor:
        """The LCN's corrected labels from the student's current features (no BN running-stat updates)."""
        with frozen_running_stats(self.model):
            h = _features(self.model, noisy.x)
        return self.lcn(h, noisy.label)

    def state_dict(self) -> dict[str, Any]:
        return {"lcn": self.lcn.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lcn.load_state_dict(state["lcn"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.engine.load_state_dict(state["engine"])
