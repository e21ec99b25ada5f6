"""L2RW — Learning to Reweight Examples (Ren et al., ICML'18; docs/methods/l2rw.md).

Per step, at the current weights w and with no meta-model:

    g_c   = ∇_w CE(clean batch)                           one clean gradient (averaged over workers)
    s_i   = ⟨∇_w ℓ_i(w), g_c⟩ = J_w ℓ(w) · g_c             one forward-mode JVP of the per-sample CE vector
    u_i   = max(0, s_i) normalised to sum 1 over the batch  (stop-gradient; all zero if no row helps)
    step  on Σ_i u_i ℓ_i

s_i is −∂L_clean(w − ε Σ_j u_j ∇ℓ_j)/∂u_i / ε at ε → 0: the official code's
`tf.gradients(grads_a, eps, grad_ys=grads_b)` at ε = 0 (a unit look-ahead that leaves w unchanged). Through the engine's "weighted" family,
so the network is never rebuilt and there is no second-order autograd: the engine's look-ahead-first
meta-gradient with the identity step (`Step.identity()`); `meta_grad: exact` computes the same scores by double
backward (the reference). docs/methods/l2rw.md. With batch norm, ℓ_i depends on the whole batch through the batch
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
from metacorrect.methods.base import Batch, Capabilities, Method, MethodConfig, MethodContext
from metacorrect.methods.engine import META_GRADS, Rows, Step, lookahead_meta_grad, normalised_weights
from metacorrect.methods.table import SampleTable


@dataclass
class L2RWConfig(MethodConfig):
    name: str = "l2rw"
    meta_grad: str = "fast"  # fast (JVP of the per-sample losses) | exact (double backward, the reference)
    # half of each clean batch joins the student's loss, half is the meta batch (not in the paper: on a small data
    # set the clean images then teach the student directly as well as steer it; MLC's official code does it)
    mix_clean: bool = False

    def validate(self) -> list[str]:
        return field_problems("method", self, {"meta_grad": one_of(META_GRADS)})


class L2RW(Method, name="l2rw", config=L2RWConfig, capabilities=Capabilities(weighs_samples=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.table = SampleTable("weights", self.num_noisy, self.collective, self.device)

    def example_weights(self, noisy: Batch, clean: Batch) -> tuple[Tensor, Rows, float]:
        """(mean-1 weights u of the noisy rows, their Rows, the clean CE at w), before any step.

        The identity look-ahead makes the meta-gradient −r·s_i with s_i = ⟨∇_w ℓ_i(w), g_c⟩; normalising
        max(0, −dL/du_i) gives L2R's weights (r > 0 is the same for every row that counts)."""
        result = lookahead_meta_grad(self.model, self.optimizer, "weighted", noisy.x, None,
                                     torch.ones(len(noisy), device=noisy.x.device), clean.x, clean.label,
                                     step=Step.identity(), labels=noisy.label, weight=noisy.weight,
                                     clean_weight=clean.weight, collective=self.collective,
                                     meta_grad=self.mcfg.meta_grad, loss_scale=self.loss_scales.meta)
        # fp16: the weights do not depend on the loss scale; an overflow weights no row (as a zero weight sum).
        if not self.loss_scales.meta.finish([result.grad_a]):
            return torch.zeros_like(result.grad_a), result.rows, result.meta_loss
        return normalised_weights(-result.grad_a, result.rows, self.collective), result.rows, result.meta_loss

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        meta, train = self.split_clean(clean)
        with self.meta_phase():
            u, rows, clean_loss = self.example_weights(noisy, meta)
        self.table.write(noisy.ids, u, noisy.label, counts=rows.counts)
        ce = F.cross_entropy(self.model(noisy.x), noisy.label, reduction="none")
        loss = self.student_step((u * ce).mean() if len(ce) else ce.sum(), noisy.weight, train)
        return {"train_loss": float(loss.detach()), "noisy_loss": float(ce.detach().mean()),
                "clean_loss": clean_loss, "meta_loss": clean_loss,
                "weight_zero_fraction": float((u == 0).double().mean()) if len(u) else 0.0}

    def sample_weights(self, noisy: Batch) -> Tensor:
        """The weight (mean 1 over its training batch) each sample got the last time it was trained on."""
        return self.table.read(noisy.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            self.table.load_state_dict(state["weights"])
