"""MSLG — Meta Soft Label Generation (Algan & Ulusoy, ICPR'20; README "Learned labels").

Per noisy sample a row of label logits y^d in the label table, initialised to K·onehot(ỹ); the soft
label is ŷ = softmax(y^d). After `warmup_epochs` of plain cross-entropy on the noisy labels, every
step (the paper's Algorithm / official `metapencil`):

    1. p = softmax(student(x));  L_c = KL(p ‖ ŷ) = Σ p log p + ⟨p, −log ŷ⟩     (engine family "reverse_kl")
    2. look-ahead w' = w − s ∇_w L_c;  L_meta = CE(student_w'(x_clean), y_clean)
    3. y^d ← y^d − label_lr · ∂L_meta/∂y^d                                   (rows of this batch)
    4. with the NEW ŷ, one real step on  L_c + gamma · L_e,  L_e = −Σ p log p  (entropy, as in PENCIL)

Step 2–3 is the labels-first look-ahead (`lookahead.labels_first_meta_grad`: one clean gradient at w'
and one forward-mode JVP, no second-order autograd and no BN running-stat updates — the official
functional forward calls `F.batch_norm(training=True)` on the real running buffers, we do not).

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
from metacorrect.config import MethodConfig
from metacorrect.methods.base import Batch, Method
from metacorrect.methods.label_table import LabelTable, onehot_logits
from metacorrect.methods.lookahead import labels_first_meta_grad
from metacorrect.methods.metagrad import MODES, lower_loss

LABEL_TABLE_FILE = "label_table.parquet"


@dataclass
class MSLGConfig(MethodConfig):
    name: str = "mslg"
    K: float = 10.0  # y^d init = K·onehot(ỹ); official default 10 (ŷ = 0.99959 on ỹ for C = 10)
    label_lr: float = 400.0  # SGD step on the label logits; = official β 4000 · 0.5 / C(10) with lookahead_lr 0.5
    lookahead_lr: float | None = None  # null: the optimizer's real step; official: a fixed plain step of 0.5
    gamma: float = 1.0  # weight of the entropy term L_e (official 1)
    warmup_epochs: int = 1  # epochs of plain CE on the noisy labels first (official: 44 of 120 CIFAR-10, 1 Clothing1M)
    meta_grad: str = "fast"  # fast (JVP) | exact (create_graph reference, one worker)

    # Default sweep: the label-logit scale K and the label step (the two the paper's code fixes per data set).
    search_space: ClassVar[dict[str, Any]] = {"method.K": {"loguniform": [1.0, 1000.0]},
                                              "method.label_lr": {"loguniform": [100.0, 20000.0]},
                                              "method.warmup_epochs": {"choice": [0, 1, 2, 5]}}

    def validate(self) -> list[str]:
        return field_problems("method", self, {
            "K": POSITIVE, "label_lr": POSITIVE, "lookahead_lr": POSITIVE.or_null("the real step"),
            "gamma": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "meta_grad": one_of(MODES)})


class MSLG(Method):
    name = "mslg"
    config_class = MSLGConfig

    def __init__(self, cfg, model, optimizer, num_classes, num_noisy, collective, image_shape=None):
        super().__init__(cfg, model, optimizer, num_classes, num_noisy, collective, image_shape)
        device = next(model.parameters()).device
        self.table = LabelTable(num_noisy, num_classes, onehot_logits(self.mcfg.K), collective, device)
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def warming_up(self) -> bool:
        return self.epoch < self.mcfg.warmup_epochs

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        if self.warming_up:
            loss = F.cross_entropy(self.model(noisy.x), noisy.label) if len(noisy) else noisy.x.sum() * 0.0
            self.optimizer_step(loss, noisy.weight)
            return {"train_loss": float(loss.detach())}
        m = self.mcfg
        real = noisy.weight > 0  # a stand-in batch (weight 0) carries clean ids: it must not touch the table
        logits = self.model(noisy.x)
        rows = self.table.rows(noisy.ids, noisy.label) if real else torch.zeros_like(logits)
        leaf = rows.detach().requires_grad_(True)
        a = -F.log_softmax(leaf, dim=1)  # reverse_kl family: ⟨p, −log ŷ⟩
        log_p = F.log_softmax(logits, dim=1)
        neg_entropy = (log_p.exp() * log_p).sum(1).mean() if real else logits.sum() * 0.0

        def kl(targets: Tensor) -> Tensor:  # L_c = KL(p ‖ ŷ) = Σ p log p + ⟨p, −log ŷ⟩
            return neg_entropy + lower_loss("reverse_kl", logits, targets)

        with self.meta_phase():
            result = labels_first_meta_grad(
                self.model, self.optimizer, "reverse_kl", noisy.x, kl, a, clean.x, clean.label,
                weight=noisy.weight, clean_weight=clean.weight, collective=self.collective, step=m.lookahead_lr,
                mode=m.meta_grad)
            (grad_rows,) = torch.autograd.grad(a, leaf, result.grad_a)
            new_rows = (rows - m.label_lr * grad_rows).detach()
            keep = slice(None) if real else slice(0, 0)
            self.table.update(noisy.ids[keep], new_rows[keep], noisy.label[keep])

        kl_new = kl(-F.log_softmax(new_rows, dim=1))
        loss = kl_new - m.gamma * neg_entropy  # + γ·L_e, L_e = −Σ p log p
        self.optimizer_step(loss, noisy.weight)
        changed = (new_rows.argmax(1) != noisy.label).float().mean() if real else torch.zeros(())
        return {"train_loss": float(loss.detach()), "kl_loss": float(kl_new.detach()),
                "entropy": float(-neg_entropy.detach()),
                "meta_loss": result.meta_loss, "clean_loss": result.meta_loss,
                "label_grad_norm": float(grad_rows.norm()), "labels_changed": float(changed)}

    @torch.no_grad()
    def soft_labels(self, noisy: Batch) -> Tensor:
        return F.softmax(self.table.rows(noisy.ids, noisy.label), dim=1)

    def export_files(self) -> dict[str, bytes]:
        return {LABEL_TABLE_FILE: self.table.to_parquet(lambda v: F.softmax(v, dim=1))}

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.load_state_dict(state["table"])
