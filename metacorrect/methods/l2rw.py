"""L2RW — Learning to Reweight Examples (Ren et al., ICML'18; README "IEG, MW-Net and L2RW").

Per step, at the current weights w and with no meta-model:

    g_c   = ∇_w CE(clean batch)                           one clean gradient (averaged over workers)
    s_i   = ⟨∇_w ℓ_i(w), g_c⟩ = J_w ℓ(w) · g_c             one forward-mode JVP of the per-sample CE vector
    u_i   = max(0, s_i) normalised to sum 1 over the batch  (stop-gradient; all zero if no row helps)
    step  on Σ_i u_i ℓ_i

s_i is −∂L_clean(w − ε Σ_j u_j ∇ℓ_j)/∂u_i / ε at ε → 0: the official code's
`tf.gradients(grads_a, eps, grad_ys=grads_b)` at ε = 0 (a unit look-ahead that leaves w unchanged). Through the engine's "weighted" family,
so the network is never rebuilt and there is no second-order autograd; `meta_grad: exact` computes the same
scores by double backward (the reference). With batch norm, ℓ_i depends on the whole batch through the batch
statistics; the JVP and the exact path both include that, as the official double-grad does.

Paper vs official code: the official code starts the weights at ε = 0 (so the look-ahead is the identity) and
normalises with a guarded sum; both are what this does. IEG's re-implementation (`ieg/models/l2rmodel.py`)
takes a 0.1 meta step from w instead (not offered here: `ieg` has that look-ahead). The clean batch is only a
meta batch (it does not join the student's loss), as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metacorrect.checks import field_problems, one_of
from metacorrect.config import MethodConfig
from metacorrect.methods.base import Batch, Method
from metacorrect.methods.metagrad import MODES, exact_mixed_grads, lower_jvp
from metacorrect.methods.reweight import (Rows, WeightTable, current_state, mean_clean_gradient,
                                          normalised_weights, rows_of)



@dataclass
class L2RWConfig(MethodConfig):
    name: str = "l2rw"
    meta_grad: str = "fast"  # fast (JVP of the per-sample losses) | exact (double backward, the reference)

    def validate(self) -> list[str]:
        return field_problems("method", self, {"meta_grad": one_of(MODES)})


def per_sample_scores(model, params, buffers, x: Tensor, labels: Tensor, direction: dict[str, Tensor],
                      mode: str = "fast") -> Tensor:
    """s_i = ⟨∇_w ℓ_i(w), direction⟩ for the per-sample CE ℓ_i at `params`, (n,), in the model's mode."""
    if mode == "fast":
        return lower_jvp(model, params, buffers, x, direction, "weighted", labels)
    eps = torch.zeros(len(x), dtype=x.dtype, device=x.device, requires_grad=True)
    ones = torch.ones_like(eps)

    def lower(logits: Tensor) -> Tensor:  # Σ (1 + ε_i) ℓ_i: d/dε_i of ⟨direction, ∇ lower⟩ = s_i
        return ((ones + eps) * F.cross_entropy(logits, labels, reduction="none")).sum()

    return exact_mixed_grads(model, params, buffers, x, lower, [eps], direction)[0]


class L2RW(Method):
    name = "l2rw"
    config_class = L2RWConfig

    def __init__(self, cfg, model, optimizer, num_classes, num_noisy, collective, image_shape=None):
        super().__init__(cfg, model, optimizer, num_classes, num_noisy, collective, image_shape)
        self.table = WeightTable(num_noisy, next(model.parameters()).device)

    def example_weights(self, noisy: Batch, clean: Batch) -> tuple[Tensor, Rows, float]:
        """(mean-1 weights u of the noisy rows, their Rows, the clean CE at w), before any step."""
        params, buffers = current_state(self.model)
        g_clean, clean_loss = mean_clean_gradient(self.model, params, buffers, clean, self.collective)
        scores = per_sample_scores(self.model, params, buffers, noisy.x, noisy.label, g_clean, self.mcfg.meta_grad)
        rows = rows_of(noisy, self.collective)
        return normalised_weights(scores, rows, self.collective), rows, clean_loss

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        with self.meta_phase():
            u, rows, clean_loss = self.example_weights(noisy, clean)
        self.table.record(noisy.ids, u, rows.share, self.collective)
        ce = F.cross_entropy(self.model(noisy.x), noisy.label, reduction="none")
        loss = (u * ce).mean() if len(ce) else ce.sum()
        self.optimizer_step(loss, noisy.weight)
        return {"train_loss": float(loss.detach()), "noisy_loss": float(ce.detach().mean()),
                "clean_loss": clean_loss, "meta_loss": clean_loss,
                "weight_zero_fraction": float((u == 0).double().mean()) if len(u) else 0.0}

    def sample_weights(self, noisy: Batch) -> Tensor:
        """The weight (mean 1 over its training batch) each sample got the last time it was trained on."""
        return self.table.lookup(noisy.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            self.table.load_state_dict(state["weights"])
