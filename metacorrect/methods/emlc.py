"""EMLC — Enhanced Meta Label Correction (Taraday & Baskin, 2023; docs/methods/emlc.md).

The teacher is independent of the student: its own backbone (feature extractor + classifier, same
architecture as the student, built with `build_backbone` from the same model config), and a gate that
looks at the teacher's features and an embedding of the noisy label:

    w_i = sigmoid(MLP([h_teacher(x_i), Emb(ỹ_i)]))       MLP: Linear -> ReLU -> Linear(hidden -> 1)
    q_i = w_i · onehot(ỹ_i) + (1 − w_i) · softmax(teacher(x_i))

The student trains on q (soft-target CE). Every k steps the teacher takes one step on (Eq. 12)

    CE(teacher(x_clean), y_clean) + BCE(gate on the clean batch with every other label corrupted) + META,

where META's gradient is the fast k-step meta-gradient (FPMG: one JVP through the student at each
recorded old weight, one VJP through the teacher; Prop. 1 for k = 1, Prop. 2 for k > 1) from the engine
(`discount: shrink`; or `discount: momentum`, docs/k_step_discount.md), real step first,
look-ahead lr = the optimizer's current lr. Unlike the official multi-step code, which pairs chunk j's JVP
with chunk k−1−j's targets, each recorded step's JVP is paired with that step's own targets
(docs/methods/emlc.md).

Paper vs official code (both selectable; the paper's values are the defaults):
- corruption for the gate's BCE: the paper's method (Eq. 12, Table 4) uses it; `main_cifar.py` passes
  `injection_mode='none'` (BCE off for CIFAR), `main_clothing.py` 'adversarial'  -> `corruption: none`.
- clean rows in the student's loss: official Clothing1M `mix_g=True` (half the clean batch trains the
  student, half is the meta batch), CIFAR `mix_g=False`; the paper does not mention it  -> `mix_clean`.
- teacher optimizer: the paper's Table 5 lists SGD, lr 0.02, momentum 0.9, weight decay 0 (the defaults);
  the official code steps teacher and gate with SGD(lr = meta_lr), no momentum (`teacher_momentum: 0`).
- student weight decay (optim.weight_decay, not a method field): paper Table 5: 0; official code: 5e-4.
- clean batch size (train.clean_batch_size): paper Table 5: 32; official code: the noisy batch size (128).
- strong augmentation (AutoAugment) of the teacher's clean batch is not applied here: the method sees
  normalised tensors and digits' 8x8 grey images have no AutoAugment policy; the platform's
  `data.augment` (shift / crop_flip) applies to the clean batch as to the noisy one.
- the teacher runs on the noisy batch and on the clean batch separately (the official code concatenates
  them into one forward, sharing BN batch statistics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.checks import UNIT_HALF_OPEN, field_problems, one_of
from metacorrect.methods.backbones import Backbone, build_backbone
from metacorrect.methods.base import (Batch, Capabilities, Method, MethodConfig, MethodContext, any_nonzero_grad,
                                      engine_discount, float_buffers, grads_of, meta_problems, split_clean,
                                      student_loss)
from metacorrect.methods.engine import MetaGradEngine, frozen_running_stats, lower_loss

CORRUPTIONS = ("adversarial", "random", "none")
DISCOUNTS = ("shrink", "momentum")
TEACHER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class EMLCConfig(MethodConfig):
    name: str = "emlc"
    k: int = 1  # look-ahead steps; paper Table 1 reports k=1 and k=5 (k=5 best on CIFAR, k=1 on Clothing1M)
    meta_grad: str = "fast"  # fast (FPMG: JVP + VJP) | exact (double-backward reference)
    discount: str = "shrink"  # k > 1: shrink (the paper's Prop. 2, Π(1 − s)) | momentum (docs/k_step_discount.md)
    meta_lr: float = 0.02  # teacher + gate lr: paper Table 5 / official CIFAR 0.02 (Clothing1M 0.1)
    teacher_optimizer: str = "sgd"  # sgd (paper and official) | adam
    teacher_momentum: float = 0.9  # paper Table 5 (SGD, momentum 0.9); official code: SGD(lr=meta_lr), momentum 0
    meta_weight_decay: float = 0.0  # teacher weight decay (official and Table 5: 0)
    embed_dim: int = 128  # label embedding (official label_emb 128)
    hidden_dim: int = 128  # gate MLP: one hidden layer of 128 units (Table 5)
    corruption: str = "adversarial"  # gate BCE on half of each clean batch: adversarial | random | none (official CIFAR)
    teacher_ce: bool = True  # the teacher's supervised CE on the clean batch (Eq. 12's L_CE)
    mix_clean: bool = False  # half the clean batch into the student's loss (official Clothing1M mix_g=True)

    # Default sweep: look-ahead k, teacher lr (paper: 0.02 CIFAR, 0.1 Clothing1M), gate hidden size, student lr.
    search_space: ClassVar[dict[str, Any]] = {"method.k": {"choice": [1, 2, 5, 10]},
                                              "method.meta_lr": {"loguniform": [0.005, 0.2]},
                                              "method.hidden_dim": {"choice": [64, 128, 256]},
                                              "optim.lr": {"loguniform": [0.005, 0.2]}}

    def validate(self) -> list[str]:
        return meta_problems(self, DISCOUNTS) + field_problems("method", self, {
            "corruption": one_of(CORRUPTIONS), "teacher_optimizer": one_of(TEACHER_OPTIMIZERS),
            "teacher_momentum": UNIT_HALF_OPEN})


class Teacher(nn.Module):
    """Feature extractor + classifier (a Backbone) and the label-retaining gate."""

    def __init__(self, backbone: Backbone, num_classes: int, embed_dim: int = 128, hidden_dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.embedding = nn.Embedding(num_classes, embed_dim)
        self.gate = nn.Sequential(nn.Linear(backbone.feature_dim + embed_dim, hidden_dim), nn.ReLU(),
                                  nn.Linear(hidden_dim, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone.features(x)
        return self.backbone.classifier(h), h

    def gate_logit(self, h: Tensor, noisy_label: Tensor) -> Tensor:
        return self.gate(torch.cat([h, self.embedding(noisy_label)], dim=1)).squeeze(1)

    def targets(self, x: Tensor, noisy_label: Tensor) -> tuple[Tensor, Tensor]:
        """(q, w): the gated soft target (N, C) and the gate weight w ∈ (0, 1) (N,)."""
        logits, h = self(x)
        w = torch.sigmoid(self.gate_logit(h, noisy_label)).unsqueeze(1)
        onehot = F.one_hot(noisy_label, self.num_classes).to(logits.dtype)
        return w * onehot + (1.0 - w) * F.softmax(logits, dim=1), w.squeeze(1)


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """(H, W, C) good enough for `build_backbone` to rebuild the student's architecture, for callers that
    construct the method without `image_shape`: conv backbones only need the channel count and the MLP
    only needs H·W·C, both readable from the student's first layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return 1, 1, m.in_channels
        if isinstance(m, nn.Linear):
            return 1, m.in_features, 1
    raise TypeError("emlc: cannot infer the input shape of the student (no Conv2d/Linear layer)")


class EMLC(Method, name="emlc", config=EMLCConfig, capabilities=Capabilities(corrects_labels=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        m, model, collective, cfg, num_classes = self.mcfg, self.model, self.collective, self.cfg, self.num_classes
        image_shape = self.image_shape
        p = next(model.parameters())
        backbone = build_backbone(cfg.model.arch, num_classes, image_shape or input_shape_of(model),
                                  cfg.model.width, cfg.model.pretrained)
        self.teacher = Teacher(backbone, num_classes, m.embed_dim, m.hidden_dim).to(p.device, p.dtype)
        self.teacher.train()
        collective.sync_module_(self.teacher)  # identical teacher on every worker
        params = [q for q in self.teacher.parameters() if q.requires_grad]
        if m.teacher_optimizer == "adam":
            self.meta_optimizer = torch.optim.Adam(params, lr=m.meta_lr, weight_decay=m.meta_weight_decay)
        else:
            self.meta_optimizer = torch.optim.SGD(params, lr=m.meta_lr, momentum=m.teacher_momentum,
                                                  weight_decay=m.meta_weight_decay)
        self.meta_params = params
        self.engine = MetaGradEngine(model, self.optimizer, "soft_ce", k=m.k, meta_grad=m.meta_grad,
                                     discount=engine_discount(m.k, m.discount), collective=collective,
                                     meta_params=params, loss_scale=self.loss_scales.meta)
        self._count = 0  # steps taken: keys the targets cached for the recorded steps
        self._cache: dict[int, Tensor] = {}  # step -> targets with graph to the teacher (the real step's forward)

    # ---- targets --------------------------------------------------------------------------------------
    def _targets(self, context: tuple[Tensor, Tensor, int]) -> Tensor:
        """The recorded step's targets with graph to the teacher: cached from the real step, or recomputed
        (after a resume) with the same train-mode batch statistics and no running-stat update."""
        x, noisy_label, key = context
        q = self._cache.get(key)
        if q is None:
            with frozen_running_stats(self.teacher):
                q, _ = self.teacher.targets(x, noisy_label)
        return q

    # ---- one iteration --------------------------------------------------------------------------------
    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        m = self.mcfg
        meta, train = split_clean(clean, m.mix_clean)
        self._count += 1
        context = (noisy.x, noisy.label, self._count)
        with torch.enable_grad():  # one teacher forward (BN running stats updated once); graph kept for META
            q, w = self.teacher.targets(noisy.x, noisy.label)
        self._cache[self._count] = q
        soft = lower_loss("soft_ce", self.model(noisy.x), q.detach())
        clean_ce = F.cross_entropy(self.model(train.x), train.label) if train is not None else None
        loss, weight, scale = student_loss(soft, float(noisy.weight), clean_ce,
                                           train.weight if train is not None else 0.0)
        self.engine.record(noisy.x, context, weight=weight, scale=scale)
        if not self.optimizer_step(loss, weight):  # fp16 skipped the real step: it is no look-ahead
            self.engine.drop_last()

        out = {"train_loss": float(loss.detach()), "noisy_loss": float(soft.detach()),
               "gate_mean": float(w.detach().mean())}
        if clean_ce is not None:
            out["clean_loss"] = float(clean_ce.detach())
        if self.engine.ready:
            with self.meta_phase():
                out |= self._teacher_step(clean, meta)
            out.setdefault("clean_loss", out["meta_loss"])
        return out

    def _teacher_step(self, clean: Batch, meta: Batch) -> dict[str, float]:
        m = self.mcfg
        out: dict[str, float] = {}
        self.meta_optimizer.zero_grad(set_to_none=False)
        logits, h = self.teacher(clean.x)
        loss = logits.sum() * 0.0
        if m.teacher_ce:
            ce = F.cross_entropy(logits, clean.label)
            out["teacher_ce"] = float(ce.detach())
            loss = loss + ce
        if m.corruption != "none":
            bce, acc = self._gate_bce(logits, h, clean.label)
            out["gate_bce"], out["gate_accuracy"] = float(bce.detach()), acc
            loss = loss + bce
        meta_scale = self.loss_scales.meta  # fp16: CE + BCE join the meta-gradient's update under its loss scale
        meta_scale.scale(loss).backward()
        # CE + BCE: mean over the clean rows of all workers.
        self.collective.weighted_mean_(grads_of(self.teacher), clean.weight)
        meta_scale.unscale_grads_(grads_of(self.teacher))  # before meta_backward, whose update covers them
        result = self.engine.meta_backward(meta.x, meta.label, self._targets, clean_weight=meta.weight)
        self._cache.clear()
        # BN running stats identical on every replica; only now, as the cached targets' graph saved them.
        buffers = float_buffers(self.teacher)
        if buffers:
            self.collective.weighted_mean_(buffers, 1.0)
        out["meta_loss"] = result.meta_loss
        if result.meta_step and any_nonzero_grad(self.meta_params):
            self.meta_optimizer.step()
        return out

    def _gate_bce(self, logits: Tensor, h: Tensor, label: Tensor) -> tuple[Tensor, float]:
        """Every other clean row gets a corrupted label; the gate learns whether the label it sees is right."""
        fake = label.clone()
        rows = torch.arange(0, len(label), 2, device=label.device)
        if self.mcfg.corruption == "random":  # uniform, may hit the right class (then the target is 1)
            fake[rows] = torch.randint(0, self.num_classes, (len(rows),), device=label.device)
        else:  # adversarial: the teacher's strongest wrong class
            wrong = logits.detach().clone()
            wrong[torch.arange(len(label), device=label.device), label] = float("-inf")
            fake[rows] = wrong.argmax(dim=1)[rows]
        target = (fake == label).to(logits.dtype)
        z = self.teacher.gate_logit(h, fake)
        acc = float(((z > 0).to(logits.dtype) == target).to(logits.dtype).mean())
        return F.binary_cross_entropy_with_logits(z, target), acc

    # ---- beliefs and checkpoint -----------------------------------------------------------------------
    @torch.no_grad()
    def soft_labels(self, noisy: Batch) -> Tensor:
        """The gated targets, with the teacher in the student's current mode (eval during evaluation)."""
        was = self.teacher.training
        self.teacher.train(self.model.training)
        try:
            with frozen_running_stats(self.teacher):
                q, _ = self.teacher.targets(noisy.x, noisy.label)
        finally:
            self.teacher.train(was)
        return q

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "engine": self.engine.state_dict(), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.engine.load_state_dict(state["engine"])
        self._count = int(state["count"])
        self._cache.clear()
