"""MW-Net — Meta-Weight-Net (Shu et al., NeurIPS'19; docs/methods/mwnet.md).

A VNet (1 → hidden → 1, ReLU, sigmoid) maps each noisy sample's loss (detached) to its weight. Per step, in
the paper's order (virtual step → VNet update → real step with the updated VNet):

    ℓ = CE(model_w(x), ỹ) per sample ; v = VNet(ℓ)          one forward (the real step's forward, kept)
    w' = w − lr · ∇_w (1/n) Σ v_i ℓ_i                       plain SGD at the current lr, no momentum/wd
    g' = ∇_w CE(model_w'(x_clean))                          one clean gradient at w' (functional_call)
    dL_clean(w')/dv_i = −lr · r · J_w ℓ_i(w) · g'           one forward-mode JVP of the per-sample losses
    VNet ← Adam(lr 1e-3, wd 1e-4) on the VJP of that through VNet
    real step on (1/n) Σ VNet_new(ℓ_i) ℓ_i                  backward through the kept forward

The coefficient is the engine's look-ahead-first meta-gradient of the "weighted" family with a fixed plain step
at the current lr (`engine.lookahead_meta_grad`, `Step.plain`): no network is rebuilt and there is no
second-order autograd; `meta_grad: exact` differentiates through the virtual step by double backward instead
(same numbers). docs/methods/mwnet.md. The engine's real-step-first loop (EMLC) would also be a legitimate
reading for a persistent VNet and saves one backward; the paper's order is used so that the real step already
uses the updated VNet, as in `MW-Net.py`.

Paper vs official code: `MW-Net.py` (the "stable version", the default here) does not normalise the weights;
`train_WRN-28-10_Meta_PGC.py` normalises them to sum 1 over the batch (`normalise: true`; over all workers'
rows, the gradient through the normalisation included). The official code selects the model by best *test*
accuracy; this platform selects on the clean validation split. VNet's optimizer: Adam(1e-3, wd 1e-4) in
`MW-Net.py` (default); the WRN script uses SGD(1e-3, momentum 0.9, nesterov, wd 5e-4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, field_problems, one_of
from metacorrect.methods.base import Batch, Capabilities, Method, MethodConfig, MethodContext
from metacorrect.methods.engine import (META_GRADS, LookaheadResult, Rows, Step, first_group, frozen_running_stats,
                                        lookahead_meta_grad, rows_of)


@dataclass
class MWNetConfig(MethodConfig):
    name: str = "mwnet"
    meta_grad: str = "fast"  # fast (JVP + VJP) | exact (double backward through the virtual step)
    meta_lr: float = 1e-3  # VNet Adam lr (MW-Net.py)
    meta_weight_decay: float = 1e-4  # VNet Adam weight decay (MW-Net.py)
    hidden_dim: int = 100  # VNet 1 -> 100 -> 1
    normalise: bool = False  # weights to sum 1 over the batch (WRN script); MW-Net.py does not
    # half of each clean batch joins the student's loss, half is the meta batch (not in the paper: on a small data
    # set the clean images then teach the student directly as well as steer it; MLC's official code does it)
    mix_clean: bool = False

    def validate(self) -> list[str]:
        return field_problems("method", self, {"meta_grad": one_of(META_GRADS), "meta_lr": POSITIVE,
                                               "meta_weight_decay": NON_NEGATIVE, "hidden_dim": AT_LEAST_ONE})


class VNet(nn.Module):
    """Linear(1, h) → ReLU → Linear(h, 1) → sigmoid on each sample's loss (PyTorch's default init, as in
    the official code)."""

    def __init__(self, hidden_dim: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))

    def forward(self, loss: Tensor) -> Tensor:
        return torch.sigmoid(self.net(loss.unsqueeze(1))).squeeze(1)


class MWNet(Method, name="mwnet", config=MWNetConfig, capabilities=Capabilities(weighs_samples=True)):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        m = self.mcfg
        p = next(self.model.parameters())
        self.vnet = VNet(m.hidden_dim).to(p.device, p.dtype)
        self.collective.sync_module_(self.vnet)
        self.meta_params = list(self.vnet.parameters())
        self.meta_optimizer = torch.optim.Adam(self.meta_params, lr=m.meta_lr, weight_decay=m.meta_weight_decay)

    # ---- weights --------------------------------------------------------------------------------------
    def _weights(self, v: Tensor, rows: Rows) -> tuple[Tensor, float]:
        """Mean-1 weights u from VNet outputs v (`engine.rows`), and the global Σ share·v (normalise only)."""
        if not self.mcfg.normalise:
            return v, 0.0
        total = float(self.collective.sum((v.detach() * rows.share).sum().reshape(1).double()).item())
        if total <= 0:
            return v * 0.0, total
        return v * (rows.share * rows.total / total), total

    def weight_coefficients(self, noisy: Batch, ce: Tensor, u: Tensor, clean: Batch) -> LookaheadResult:
        """dL_clean(w')/du_i for the look-ahead w' = w − lr·∇_w (r·Σ u_i ℓ_i), and the clean CE at w'.

        `ce`: the per-sample losses of model(x) at the current weights, with graph (kept for the real step)."""
        def lower(weights: Tensor) -> Tensor:
            return (weights * ce).mean() if len(ce) else ce.sum()

        return lookahead_meta_grad(self.model, self.optimizer, "weighted", noisy.x, lower, u, clean.x, clean.label,
                                   step=Step.plain(first_group(self.optimizer).lr), labels=noisy.label,
                                   weight=noisy.weight, clean_weight=clean.weight, collective=self.collective,
                                   meta_grad=self.mcfg.meta_grad, loss_scale=self.loss_scales.meta)

    def _vnet_step(self, v: Tensor, coeff: Tensor, rows: Rows, total: float) -> None:
        """Chain dL/du into VNet (through the normalisation, across workers), sum over workers, Adam step.
        fp16: `coeff` carries the meta loss scale through the VJP; VNet's gradient is unscaled before the step,
        which is skipped if it overflowed on any worker."""
        if self.mcfg.normalise and total > 0:
            # u_i = W s_i v_i / S, S = Σ_global s v: dL/dv_j = (W s_j / S)(c_j − T / S), T = Σ_global c s v.
            t = float(self.collective.sum((coeff * v.detach() * rows.share).sum().reshape(1).double()).item())
            coeff = rows.total * rows.share / total * (coeff - t / total)
        self.meta_optimizer.zero_grad(set_to_none=False)
        torch.autograd.backward(v, coeff.to(v.dtype))
        self.sum_grads_over_workers(self.meta_params)
        if self.loss_scales.meta.finish([p.grad for p in self.meta_params]) and rows.total > 0:
            self.meta_optimizer.step()

    # ---- one iteration --------------------------------------------------------------------------------
    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        meta, train = self.split_clean(clean)
        rows = rows_of(noisy.weight, len(noisy), self.collective)
        ce = F.cross_entropy(self.model(noisy.x), noisy.label, reduction="none")  # the real step's forward
        v = self.vnet(ce.detach())
        u, total = self._weights(v, rows)
        with self.meta_phase():
            result = self.weight_coefficients(noisy, ce, u, meta)
            self._vnet_step(v, result.grad_a, rows, total)
        meta_loss = result.meta_loss
        with torch.no_grad():
            u_new, _ = self._weights(self.vnet(ce.detach()), rows)
        loss = self.student_step((u_new * ce).mean() if len(ce) else ce.sum(), noisy.weight, train)
        return {"train_loss": float(loss.detach()), "noisy_loss": float(ce.detach().mean()),
                "meta_loss": meta_loss, "clean_loss": meta_loss, "weight_mean": float(u_new.mean())}

    @torch.no_grad()
    def sample_weights(self, noisy: Batch) -> Tensor:
        """VNet's weight of each sample's loss under the current model (its current mode: eval in evaluation)."""
        with frozen_running_stats(self.model):
            ce = F.cross_entropy(self.model(noisy.x), noisy.label, reduction="none")
        return self.vnet(ce)

    def state_dict(self) -> dict[str, Any]:
        return {"vnet": self.vnet.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vnet.load_state_dict(state["vnet"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])

