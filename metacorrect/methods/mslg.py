"""MSLG — Meta Soft Label Generation (Algan & Ulusoy, ICPR'20; docs/methods/mslg.md).

Per noisy sample a row of label logits y^d in the label table, initialised to logit_scale·onehot(ỹ) (the
paper's K); the soft
label is ŷ = softmax(y^d). After `warmup_epochs` of plain cross-entropy on the noisy labels, every
step (the paper's Algorithm / official `metapencil`):

    1. p = softmax(student(x));  L_c = KL(p ‖ ŷ) = Σ p log p + ⟨p, −log ŷ⟩     (engine family "reverse_kl")
    2. look-ahead w' = w − s ∇_w L_c;  L_meta = CE(student_w'(x_clean), y_clean)
    3. y^d ← y^d − label_lr · ∂L_meta/∂y^d                                   (rows of this batch)
    4. with the NEW ŷ, one real step on  L_c + gamma · L_e,  L_e = −Σ p log p  (entropy, as in PENCIL)

Step 2–3 is the look-ahead-first meta-gradient (`engine.lookahead_meta_grad`: one clean gradient at w' and
one forward-mode JVP, no second-order autograd and no BN running-stat updates — the official functional
forward calls `F.batch_norm(training=True)` on the real running buffers, we do not). docs/methods/mslg.md.

Choices (paper / official code and ours):
- normalisation: the official loss is a mean over batch AND classes (1/(B·C)); ours is a mean over the
  batch and a sum over classes, so the same label step needs label_lr = β_official · α / (C · s)
  with α the official look-ahead step 0.5 and s ours. Official β: 4000 (CIFAR), 1500 (Clothing1M,
  Food-101N); with the official look-ahead (`lookahead_lr: 0.5`) on CIFAR-10 that is label_lr = 400.
- look-ahead step: by default the optimizer's real step (current lr, momentum/weight decay as SGD);
  `lookahead_lr: 0.5` gives the official fixed plain-SGD step.
- label optimizer: plain SGD without momentum, as the official code (so no optimizer state).
- meta passes never update BN running statistics (the official functional forward does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metacorrect.checks import NON_NEGATIVE, POSITIVE, field_problems, one_of
from metacorrect.methods.base import Batch, Capabilities, Method, MethodConfig, MethodContext
from metacorrect.methods.engine import META_GRADS, Step, lookahead_meta_grad, lower_loss
from metacorrect.methods.table import SampleTable, onehot_logits


@dataclass
class MSLGConfig(MethodConfig):
    name: str = "mslg"
    logit_scale: float = 10.0  # y^d init = logit_scale·onehot(ỹ), the paper's K; official 10 (ŷ = 0.99959, C = 10)
    label_lr: float = 400.0  # SGD step on the label logits; = official β 4000 · 0.5 / C(10) with lookahead_lr 0.5
    lookahead_lr: float | None = None  # null: the optimizer's real step; official: a fixed plain step of 0.5
    gamma: float = 1.0  # weight of the entropy term L_e (official 1)
    warmup_epochs: int = 1  # epochs of plain CE on the noisy labels first (official: 44 of 120 CIFAR-10, 1 Clothing1M)
    meta_grad: str = "fast"  # fast (JVP) | exact (double-backward reference)
    # half of each clean batch joins the student's loss, half is the meta batch (not in the paper: on a small data
    # set the clean images then teach the student directly as well as steer it; MLC's official code does it)
    mix_clean: bool = False

    # Default sweep: the label-logit scale (the paper's K) and the label step (the official code fixes both per data set).
    search_space: ClassVar[dict[str, Any]] = {"method.logit_scale": {"loguniform": [1.0, 1000.0]},
                                              "method.label_lr": {"loguniform": [100.0, 20000.0]},
                                              "method.warmup_epochs": {"choice": [0, 1, 2, 5]}}
    renamed: ClassVar[dict[str, str]] = {"K": "logit_scale"}

    def validate(self) -> list[str]:
        return field_problems("method", self, {
            "logit_scale": POSITIVE, "label_lr": POSITIVE, "lookahead_lr": POSITIVE.or_null("the real step"),
            "gamma": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "meta_grad": one_of(META_GRADS)})


class MSLG(Method, name="mslg", config=MSLGConfig, capabilities=Capabilities(corrects_labels=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.table = SampleTable("labels", self.num_noisy, self.collective, self.device, num_classes=self.num_classes,
                                 init_row=onehot_logits(self.mcfg.logit_scale))
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def warming_up(self) -> bool:
        return self.epoch < self.mcfg.warmup_epochs

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        meta, train = self.split_clean(clean)
        if self.warming_up:
            loss = F.cross_entropy(self.model(noisy.x), noisy.label) if len(noisy) else noisy.x.sum() * 0.0
            loss = self.student_step(loss, noisy.weight, train)
            return {"train_loss": float(loss.detach())}
        m = self.mcfg
        real = noisy.weight > 0  # a stand-in batch (weight 0) carries clean ids: it must not touch the table
        logits = self.model(noisy.x)
        rows = self.table.read(noisy.ids, noisy.label) if real else torch.zeros_like(logits)
        leaf = rows.detach().requires_grad_(True)
        a = -F.log_softmax(leaf, dim=1)  # reverse_kl family: ⟨p, −log ŷ⟩
        log_p = F.log_softmax(logits, dim=1)
        neg_entropy = (log_p.exp() * log_p).sum(1).mean() if real else logits.sum() * 0.0

        def kl(targets: Tensor) -> Tensor:  # L_c = KL(p ‖ ŷ) = Σ p log p + ⟨p, −log ŷ⟩
            return neg_entropy + lower_loss("reverse_kl", logits, targets)

        with self.meta_phase():
            step = Step.optimizer() if m.lookahead_lr is None else Step.plain(m.lookahead_lr)
            result = lookahead_meta_grad(
                self.model, self.optimizer, "reverse_kl", noisy.x, kl, a, meta.x, meta.label, step=step,
                weight=noisy.weight, clean_weight=meta.weight, collective=self.collective, meta_grad=m.meta_grad,
                loss_scale=self.loss_scales.meta)
            (grad_rows,) = torch.autograd.grad(a, leaf, result.grad_a)
            # fp16: the label step in true units, skipped on overflow
            if self.loss_scales.meta.finish([grad_rows]):
                new_rows = (rows - m.label_lr * grad_rows).detach()
            else:
                new_rows = rows.detach()
            self.table.write(noisy.ids, new_rows, noisy.label, counts=real)

        kl_new = kl(-F.log_softmax(new_rows, dim=1))
        loss = self.student_step(kl_new - m.gamma * neg_entropy, noisy.weight, train)  # + γ·L_e, L_e = −Σ p log p
        changed = (new_rows.argmax(1) != noisy.label).float().mean() if real else torch.zeros(())
        return {"train_loss": float(loss.detach()), "kl_loss": float(kl_new.detach()),
                "entropy": float(-neg_entropy.detach()),
                "meta_loss": result.meta_loss, "clean_loss": result.meta_loss,
                "label_grad_norm": float(grad_rows.norm()), "labels_changed": float(changed)}

    @torch.no_grad()
    def soft_labels(self, noisy: Batch) -> Tensor:
        return F.softmax(self.table.read(noisy.ids, noisy.label), dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.load_state_dict(state["table"])
