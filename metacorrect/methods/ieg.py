"""IEG — Distilling Effective Supervision from Severe Label Noise (Zhang et al., CVPR'20;
docs/methods/ieg.md). The poster's Algorithm 1, per step on a noisy batch X_u and a probe (clean) batch X_p:

1. Pseudo labels g(x): the student's predictions on the original view and K strongly augmented views (made by
   the platform on the worker: `Batch.views`), each logit tensor divided by its RMS (`logit_norm`), softmaxes
   averaged, sharpened with temperature T (0.5).
2. Data coefficients from ONE look-ahead at the current weights w, starting from ω_i = 1/B and λ_i = 0.9:
   lower loss Σ_i ω_i CE(λ_i·onehot(ỹ_i) + (1 − λ_i)·g(x_i)),
   look-ahead w' = w − 0.1·(0.9·buf + ∇ + wd·w) (buf: the optimizer's momentum buffer), g' = ∇ [probe CE + wd]
   at w'. The lower loss is the engine's "soft_ce" family with a_i = ω_i·(λ_i·onehot(ỹ_i) + (1 − λ_i)·g(x_i)),
   so one look-ahead-first meta-gradient dL/da_i (`engine.lookahead_meta_grad`, one JVP of −log_softmax at w
   along 0.1·g') gives both by the chain rule:
       ∂L/∂ω_i ∝ ⟨dL/da_i, a_i/ω_i⟩ ,   ∂L/∂λ_i = ω_i ⟨dL/da_i, onehot(ỹ_i) − g(x_i)⟩.
   ω* = max(0, −∂L/∂ω) normalised to sum 1 (L2R); λ*_i = 1 if ∂L/∂λ_i < 0 else 0 (binary selection).
   `meta_grad: exact` gets the same two vectors by double backward (the reference path).
3. Split: rows with ω*·B ≤ `split_threshold` (default 0: the rows the meta step rejected) are likely mislabelled.
   MixUp (β = 0.5, per-row mixing weight max(λ, 1 − λ) ≥ 0.5) over a pool of B probe rows drawn with
   replacement (one-hot labels) and the original and augmented views of the noisy batch: likely-mislabelled
   rows carry their pseudo label, likely-clean rows their given label. KL consistency between the predictions
   on the original (stop-gradient) and the augmented views.
4. Loss = ½[mean CE(λ* mix) + Σ ω* CE(0.9 mix)] + CE_probe-part + p·CE_noisy-part + k·KL  (p 5, k 20); one SGD
   step (the platform's optimizer: momentum, wd); EMA of the weights (0.999, TF's num_updates warm-up
   min(0.999, (1+t)/(10+t))), evaluated beside the raw model (`ema_val_accuracy`, `ema_test_accuracy`).

Paper vs official code (`google-research/ieg`, `models/model.py`):
- the split of step 3 is the poster's Algorithm 1; the official code puts every noisy view into the MixUp pool
  with its pseudo label (`split: false`).
- the official look-ahead and probe batch are per replica; here the lower gradient and g' are averaged over
  workers, so several workers compute what one does on the whole batch (logit_norm stays per worker).
- AutoAugment (the official default) is not implemented: `strong_augment: randaugment` (RandAugment + cutout,
  the official `aug_type randaugment`) for RGB data, `affine` (rotation/shear/scale/shift + cutout) for 8x8
  digits. K (`views`) is 1 in the official code (nu = 2 predictions: original + one augmented view).
- the official MixUp draws one λ per batch in `MixMode`; here one per row (both ≥ 0.5).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT_CLOSED, UNIT_HALF_OPEN, field_problems, one_of
from metacorrect.datasets.stream import STRONG_AUGMENTS
from metacorrect.methods.base import Batch, Capabilities, Method, MethodConfig, MethodContext
from metacorrect.methods.engine import (META_GRADS, Rows, Step, first_group, frozen_running_stats,
                                        lookahead_meta_grad, normalised_weights)
from metacorrect.methods.table import SampleTable


@dataclass
class IEGConfig(MethodConfig):
    name: str = "ieg"
    meta_grad: str = "fast"  # fast (one JVP) | exact (double backward, the reference)
    meta_stepsize: float = 0.1  # look-ahead step (official meta_stepsize)
    meta_momentum: float = 0.9  # × the optimizer's momentum buffer in the look-ahead (official meta_momentum)
    mix_init: float = 0.9  # λ at which the label-mix meta-gradient is taken (official grad_eps_init)
    temperature: float = 0.5  # pseudo-label sharpening T
    views: int = 1  # K strongly augmented views per noisy image (official: 1)
    strong_augment: str = "randaugment"  # randaugment (RGB) | affine (small grey images such as digits)
    mixup_beta: float = 0.5  # MixUp Beta(β, β)
    ce_factor: float = 5.0  # p: weight of the MixUp CE on the noisy views (official ce_factor)
    consistency_factor: float = 20.0  # k: weight of the KL consistency (official consistency_factor)
    split: bool = True  # Algorithm 1's clean/mislabelled split (false: all noisy views pseudo-labelled, official)
    split_threshold: float = 0.0  # likely mislabelled when ω*·B <= this (0: rejected by the meta step)
    ema_decay: float = 0.999  # EMA of the weights for evaluation (0 disables the EMA model)

    def validate(self) -> list[str]:
        return field_problems("method", self, {
            "meta_grad": one_of(META_GRADS), "meta_stepsize": POSITIVE, "meta_momentum": UNIT_HALF_OPEN,
            "mix_init": UNIT_CLOSED, "temperature": POSITIVE, "views": AT_LEAST_ONE,
            "strong_augment": one_of(STRONG_AUGMENTS), "mixup_beta": POSITIVE, "ce_factor": NON_NEGATIVE,
            "consistency_factor": NON_NEGATIVE, "split_threshold": NON_NEGATIVE, "ema_decay": UNIT_HALF_OPEN})


# ---- pseudo labels --------------------------------------------------------------------------------------
def logit_norm(logits: Tensor) -> Tensor:
    """Logits divided by the RMS of the whole tensor (official `custom_ops.logit_norm`)."""
    return logits / logits.pow(2).mean().add(1e-8).sqrt()


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """p^(1/T) normalised per row."""
    q = p.pow(1.0 / temperature)
    return q / q.sum(dim=1, keepdim=True)


def pseudo_labels(view_logits: Sequence[Tensor], temperature: float = 0.5) -> Tensor:
    """g(x): mean over views of softmax(logit_norm(logits)), sharpened with T. Each (n, C); no randomness."""
    probs = torch.stack([F.softmax(logit_norm(z.detach()), dim=1) for z in view_logits]).mean(0)
    return sharpen(probs, temperature)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row CE against soft targets, (n,)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1)


@dataclass
class Coefficients:
    """IEG's data coefficients for one noisy batch and the meta-gradients they came from."""

    weight: Tensor  # ω*·W (mean-1 units, see engine/rows.py), (n,)
    mix: Tensor  # λ* ∈ {0, 1}, (n,); mix_init where fp16 skipped the meta step
    grad_weight: Tensor  # dL_probe(w')/du_i at u = 1 (u = ω·W), (n,)
    grad_mix: Tensor  # dL_probe(w')/dλ_i at λ = mix_init, (n,)
    meta_loss: float  # probe CE at the look-ahead weights
    rows: Rows


class IEG(Method, name="ieg", config=IEGConfig,
          capabilities=Capabilities(weighs_samples=True, eval_models=True, strong_views=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        m = self.mcfg
        self.strong_views, self.strong_augment = m.views, m.strong_augment
        self.ema: nn.Module | None = None
        if m.ema_decay > 0:
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.ema_updates = 0
        self.table = SampleTable("weights", self.num_noisy, self.collective, self.device)  # ω* per noisy id

    # ---- step 2: data coefficients --------------------------------------------------------------------
    def data_coefficients(self, noisy: Batch, clean: Batch, guess: Tensor, logits: Tensor | None = None
                          ) -> Coefficients:
        """ω* and λ* from one look-ahead at the current weights. `logits`: model(noisy.x) with graph (the
        step's own forward, reused); computed here, without touching BN running stats, when not given."""
        m = self.mcfg
        if logits is None:
            with frozen_running_stats(self.model):
                logits = self.model(noisy.x)
        onehot = F.one_hot(noisy.label, self.num_classes).to(logits.dtype)
        guess = guess.detach().to(logits.dtype)
        target = m.mix_init * onehot + (1.0 - m.mix_init) * guess  # a_i at ω_i·B = 1, λ_i = mix_init
        wd = first_group(self.optimizer).weight_decay

        def lower(targets: Tensor) -> Tensor:  # "soft_ce": mean over rows of ⟨a_i, −log p_i⟩
            return soft_cross_entropy(logits, targets).mean() if len(logits) else logits.sum()

        result = lookahead_meta_grad(self.model, self.optimizer, "soft_ce", noisy.x, lower, target, clean.x,
                                     clean.label, step=Step.plain(m.meta_stepsize, m.meta_momentum, wd),
                                     weight=noisy.weight, clean_weight=clean.weight, collective=self.collective,
                                     meta_grad=m.meta_grad, meta_weight_decay=wd, loss_scale=self.loss_scales.meta)
        # a_i = ω_i·B·(λ_i·onehot + (1 − λ_i)·g_i): the chain rule at ω_i·B = 1 gives both coefficients' gradients.
        grad_weight = (target * result.grad_a).sum(1)
        grad_mix = ((onehot - guess) * result.grad_a).sum(1)
        # fp16: ω* and λ* do not depend on the loss scale, but an overflow leaves nothing to decide on: then no
        # row is weighted (as when no row helps the probe loss) and λ stays at mix_init.
        if self.loss_scales.meta.finish([grad_weight, grad_mix]):
            weight = normalised_weights(-grad_weight, result.rows, self.collective)
            mix = (grad_mix < 0).to(logits.dtype)
        else:
            weight = torch.zeros_like(grad_weight)
            mix = torch.full_like(grad_weight, m.mix_init, dtype=logits.dtype)
        return Coefficients(weight, mix, grad_weight.detach(), grad_mix.detach(), result.meta_loss, result.rows)

    # ---- step 3: MixUp and consistency ----------------------------------------------------------------
    def _mixup_losses(self, noisy: Batch, views: Tensor, clean: Batch, guess: Tensor,
                      weight: Tensor) -> tuple[Tensor, Tensor]:
        """(CE on the mixed probe part, CE on the mixed noisy part) over one pool of B probe rows and the K+1
        views of the noisy batch."""
        m = self.mcfg
        n, dev = len(noisy), noisy.x.device
        draw = torch.randint(0, len(clean), (n,), device=dev)
        own = F.one_hot(noisy.label, self.num_classes).to(guess.dtype)
        if m.split:
            mislabelled = (weight <= m.split_threshold).unsqueeze(1)
            noisy_target = torch.where(mislabelled, guess, own)
        else:
            noisy_target = guess
        x = torch.cat([clean.x[draw], noisy.x, views.flatten(0, 1)])
        y = torch.cat([F.one_hot(clean.label[draw], self.num_classes).to(guess.dtype),
                       noisy_target.repeat(len(views) + 1, 1)])
        beta = torch.distributions.Beta(torch.tensor(m.mixup_beta, device=dev), torch.tensor(m.mixup_beta, device=dev))
        lam = beta.sample((len(x),)).to(x.dtype)
        lam = torch.maximum(lam, 1.0 - lam)
        perm = torch.randperm(len(x), device=dev)
        x_mix = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
        y_mix = lam.view(-1, 1) * y + (1 - lam.view(-1, 1)) * y[perm]
        parts = [logit_norm(z) for z in self.model(x_mix).split(n)]
        probe = soft_cross_entropy(parts[0], y_mix[:n]).mean()
        rest = soft_cross_entropy(torch.cat(parts[1:]), y_mix[n:]).mean()
        return probe, rest

    @staticmethod
    def consistency(logits: Tensor, view_logits: Tensor) -> Tensor:
        """Mean over rows of KL(softmax(stop-grad original) ‖ softmax(augmented view)), views stacked (K·n, C)."""
        k = len(view_logits) // max(len(logits), 1)
        p = logits.detach().repeat(k, 1)
        return (F.softmax(p, 1) * (F.log_softmax(p, 1) - F.log_softmax(view_logits, 1))).sum(1).mean()

    # ---- one iteration --------------------------------------------------------------------------------
    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        m = self.mcfg
        # Without platform-made views (a stand-in from the clean set, a hand-built batch) the original doubles.
        views = noisy.views if noisy.views is not None else noisy.x.unsqueeze(0)
        n = len(noisy)
        logits = self.model(noisy.x)
        view_logits = self.model(views.flatten(0, 1))
        guess = pseudo_labels([logits] + list(view_logits.split(n)), m.temperature)
        with self.meta_phase():
            co = self.data_coefficients(noisy, clean, guess, logits)
        self.table.write(noisy.ids, co.weight, noisy.label, counts=co.rows.counts)

        onehot = F.one_hot(noisy.label, self.num_classes).to(logits.dtype)
        chosen = co.mix.unsqueeze(1) * onehot + (1 - co.mix.unsqueeze(1)) * guess
        initial = m.mix_init * onehot + (1 - m.mix_init) * guess
        loss_mix = soft_cross_entropy(logits, chosen).mean()  # L_λ*
        loss_weight = (co.weight * soft_cross_entropy(logits, initial)).mean()  # L_ω* = Σ ω* CE (ω* = u/B)
        probe, rest = self._mixup_losses(noisy, views, clean, guess, co.weight)
        kl = self.consistency(logits, view_logits)
        loss = 0.5 * (loss_mix + loss_weight) + probe + m.ce_factor * rest + m.consistency_factor * kl
        self.optimizer_step(loss, noisy.weight)
        self._update_ema()
        return {"train_loss": float(loss.detach()), "meta_loss": co.meta_loss, "clean_loss": co.meta_loss,
                "mixup_probe_ce": float(probe.detach()), "mixup_noisy_ce": float(rest.detach()),
                "consistency": float(kl.detach()),
                "weight_zero_fraction": float((co.weight == 0).to(torch.float64).mean()),
                "given_label_fraction": float(co.mix.to(torch.float64).mean())}

    def sample_weights(self, noisy: Batch) -> Tensor:
        """ω*·B (mean 1 over its training batch) each sample got the last time it was trained on."""
        return self.table.read(noisy.ids)

    # ---- EMA ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        self.ema_updates += 1
        t = self.ema_updates
        decay = min(self.mcfg.ema_decay, (1.0 + t) / (10.0 + t))  # TF ExponentialMovingAverage(num_updates=step)
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)

    def eval_models(self) -> dict[str, nn.Module]:
        """The EMA weights with the student's current BN running statistics (TF averages trainables only)."""
        if self.ema is None:
            return {}
        with torch.no_grad():
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)
        return {"ema": self.ema}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": None if self.ema is None else self.ema.state_dict(), "ema_updates": self.ema_updates,
                "weights": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.ema_updates = int(state.get("ema_updates", 0))
        if "weights" in state:
            self.table.load_state_dict(state["weights"])
