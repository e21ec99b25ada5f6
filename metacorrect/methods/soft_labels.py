"""Meta-learned soft labels (Vyas, Saxena & Voice, 2020; docs/methods/soft_labels.md).

Algorithm 1, every step, labels first and then the model:

    1. look-ahead θ' = θ − s ∇_θ (1/n) Σ_i CE(f_θ(x_i), y_i(φ))      (soft-target CE, engine family "soft_ce")
    2. L_meta = CE(f_θ'(x_clean), y_clean)
    3. φ ← φ − label_lr · ∂L_meta/∂φ                                   (separate SGD, no lr schedule)
    4. one real step on the same batch with the NEW labels y(φ)

`mode: class` — one smoothing parameter α_c per class, clamped to [0, 1], initialised at 0: the target
of a sample with label c is 1 − α_c on c and α_c / (C − 1) on every other class. The α_c are shared
by all workers: their gradients are summed over workers (each worker's rows already carry their share
of the global mean), so replicas step identically.

`mode: instance` — one softmax-parameterised label per noisy sample in the label table, initialised to
mass p0 on the given label and (1 − p0)/(C − 1) on each other class (paper grid p0 ∈ {0.3, 0.5, 0.7,
0.9}); rows are updated by the workers that hold them and all-gathered into every replica.

`entropy_weighting` (noisy setting, the paper's implicit curriculum; its exact form is not given):
each sample's loss is weighted by 1 − H(y_i)/log C of its current label, renormalised to mean 1 over
the batch, so confident labels count more. The weights are constants for the meta-gradient.

Works without noise (the paper's supervised setting): prepare the data with `--noise none`.
Not in the paper, from the platform: the look-ahead step is the optimizer's real step (current lr,
momentum and weight decay as SGD does), the meta batch is the clean batch, label SGD has no momentum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metacorrect.checks import POSITIVE, UNIT_CLOSED, UNIT_OPEN, field_problems, one_of
from metacorrect.methods.base import Batch, Capabilities, Method, MethodConfig, MethodContext
from metacorrect.methods.engine import META_GRADS, Step, lookahead_meta_grad, lower_loss
from metacorrect.methods.table import SampleTable, mass_logits

SOFT_LABEL_MODES = ("class", "instance")


@dataclass
class SoftLabelsConfig(MethodConfig):
    name: str = "soft_labels"
    mode: str = "instance"  # class (one α per class) | instance (one label per sample, in the label table)
    label_lr: float = 50.0  # label SGD lr, no schedule: paper grid instance 25..200 (appendix 5..100), class 0.01..3
    alpha_init: float = 0.0  # class mode: initial smoothing α_c (paper: 0, i.e. the given one-hot labels)
    p0: float = 0.9  # instance mode: initial mass on the given label (paper grid 0.3 / 0.5 / 0.7 / 0.9)
    entropy_weighting: bool = False  # weight samples by 1 − H(label)/log C (the paper's noisy-setting curriculum)
    meta_grad: str = "fast"  # fast (JVP) | exact (double-backward reference)
    # half of each clean batch joins the student's loss, half is the meta batch (not in the paper: on a small data
    # set the clean images then teach the student directly as well as steer it; MLC's official code does it)
    mix_clean: bool = False

    # Default sweep: the paper's grids (instance mode: p0 and the label lr; our lr scale, see docs/methods/soft_labels.md).
    search_space: ClassVar[dict[str, Any]] = {"method.p0": {"choice": [0.3, 0.5, 0.7, 0.9]},
                                              "method.label_lr": {"loguniform": [25.0, 10000.0]}}

    def validate(self) -> list[str]:
        return field_problems("method", self, {
            "mode": one_of(SOFT_LABEL_MODES), "label_lr": POSITIVE, "alpha_init": UNIT_CLOSED, "p0": UNIT_OPEN,
            "meta_grad": one_of(META_GRADS)})


def smoothed_targets(alpha: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """1 − α_c on the label c, α_c/(C − 1) elsewhere, α clamped to [0, 1] (differentiable in α)."""
    a = alpha.clamp(0.0, 1.0)[labels].unsqueeze(1)
    onehot = F.one_hot(labels, num_classes).to(alpha.dtype)
    return onehot * (1.0 - a) + (1.0 - onehot) * a / (num_classes - 1)


def entropy_weights(targets: Tensor) -> Tensor:
    """1 − H/log C per row, renormalised to mean 1 over the batch (constants: detached)."""
    t = targets.detach()
    h = -(t * t.clamp_min(1e-12).log()).sum(1) / math.log(t.shape[1])
    w = (1.0 - h).clamp_min(0.0)
    return w * (len(w) / w.sum().clamp_min(1e-12))


class SoftLabels(Method, name="soft_labels", config=SoftLabelsConfig, capabilities=Capabilities(corrects_labels=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        p = next(self.model.parameters())
        self.alpha: Tensor | None = None
        if self.mcfg.mode == "class":
            self.alpha = torch.full((self.num_classes,), self.mcfg.alpha_init, device=p.device, dtype=p.dtype)
        else:
            self.table = SampleTable("labels", self.num_noisy, self.collective, p.device,
                                     num_classes=self.num_classes, init_row=mass_logits(self.mcfg.p0))

    # ---- labels ---------------------------------------------------------------------------------------
    def _parameters(self, noisy: Batch, real: bool) -> Tensor:
        """This step's label parameters as a fresh leaf: α (C,) or the batch's table rows (n, C)."""
        if self.alpha is not None:
            return self.alpha.detach().clone().requires_grad_(True)
        rows = self.table.read(noisy.ids, noisy.label) if real else torch.zeros(
            len(noisy), self.num_classes, device=noisy.x.device)
        return rows.detach().requires_grad_(True)

    def _targets(self, params: Tensor, labels: Tensor) -> Tensor:
        if self.alpha is not None:
            return smoothed_targets(params, labels, self.num_classes)
        return F.softmax(params, dim=1)

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        m = self.mcfg
        meta, train = self.split_clean(clean)
        real = noisy.weight > 0  # a stand-in batch (weight 0) carries clean ids: it must not touch the table
        logits = self.model(noisy.x)
        params = self._parameters(noisy, real)
        targets = self._targets(params, noisy.label)
        weights = entropy_weights(targets) if m.entropy_weighting else None
        a = targets * weights.unsqueeze(1) if weights is not None else targets

        def lower(t: Tensor) -> Tensor:
            return lower_loss("soft_ce", logits, t)

        with self.meta_phase():
            result = lookahead_meta_grad(self.model, self.optimizer, "soft_ce", noisy.x, lower, a, meta.x,
                                         meta.label, step=Step.optimizer(), weight=noisy.weight,
                                         clean_weight=meta.weight, collective=self.collective,
                                         meta_grad=m.meta_grad, loss_scale=self.loss_scales.meta)
            (grad,) = torch.autograd.grad(a, params, result.grad_a)
            with torch.no_grad():
                if self.alpha is not None:
                    grad = self.collective.sum(grad)  # shared α: every worker's rows contribute
                apply = self.loss_scales.meta.finish([grad])  # fp16: the label step in true units, skipped on overflow
                if self.alpha is not None:
                    if apply:
                        self.alpha.sub_(m.label_lr * grad).clamp_(0.0, 1.0)
                    new_targets = smoothed_targets(self.alpha, noisy.label, self.num_classes)
                else:
                    new_rows = params.detach() - m.label_lr * grad if apply else params.detach()
                    self.table.write(noisy.ids, new_rows, noisy.label, counts=real)
                    new_targets = F.softmax(new_rows, dim=1)
        if weights is not None:
            new_targets = new_targets * entropy_weights(new_targets).unsqueeze(1)
        loss = self.student_step(lower(new_targets), noisy.weight, train)
        out = {"train_loss": float(loss.detach()), "meta_loss": result.meta_loss, "clean_loss": result.meta_loss,
               "label_grad_norm": float(grad.norm())}
        if self.alpha is not None:
            out["alpha_mean"] = float(self.alpha.mean())
        return out

    @torch.no_grad()
    def soft_labels(self, noisy: Batch) -> Tensor:
        if self.alpha is not None:
            return smoothed_targets(self.alpha, noisy.label, self.num_classes)
        return F.softmax(self.table.read(noisy.ids, noisy.label), dim=1)

    def state_dict(self) -> dict[str, Any]:
        if self.alpha is not None:
            return {"alpha": self.alpha.cpu()}
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.alpha is not None:
            self.alpha.copy_(state["alpha"])
        else:
            self.table.load_state_dict(state["table"])
