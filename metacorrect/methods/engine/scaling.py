"""fp16's loss scales, in one place: torch's `GradScaler` for the real step and `MetaLossScale` for the meta
passes (`train.precision: fp16`; fp32 and bf16 build both switched off and never touch them).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and values above 65504 overflow. A loss scale
S multiplies the loss before a backward pass so that small gradients survive, and the result is divided by S
in fp32 afterwards; a step whose gradients came out inf or NaN is skipped and S is halved (it doubles again
after `growth_interval` clean steps).

Real step. `LossScales.real_step`: backward of S·loss, the gradients averaged over workers, THEN
`GradScaler.step` unscales, looks for inf/NaN and steps or skips. Averaging first means every worker sees
the same averaged gradients, so all skip the same steps and stay in lockstep (a NaN on one worker reaches
every worker through the all-reduce). A stand-in batch (weight 0) counts for nothing, so its gradients are
zeroed before the average: an overflow of rows that do not count must not skip the others' step.

Meta passes. Every meta-gradient here is linear in g′, the clean loss's gradient at the look-ahead weights
(docs/design.md): dL/da = −r · J_w f(w) · (s ⊙ g′), then a VJP through the meta-model. Two passes of
different kinds need two scales, which `MetaLossScale` holds:

- `grad` (S_g): the losses the meta step takes gradients of by backward (the clean loss at w′, the look-ahead's
  lower loss, EMLC's teacher losses). Those gradients are unscaled as soon as they are taken
  (`unscale_grads_`), in fp32.
- `tangent` (S_t): the JVP's tangent, normalised so that its largest entry is about S_t (`normalise`): the
  tangent is c · s ⊙ g′ with c = S_t / max|s ⊙ g′| rounded down to a power of two. By linearity dL/da and
  every cotangent of the VJP through a meta-model carry c too, and one division at the very end (`unscale_`)
  undoes it.

One scale for both does not work: batch norm's forward-mode formula sums tangent × activation over a channel's
N·H·W entries in float16, so the JVP overflows at tangents far below what a backward pass tolerates (a tangent
of order 1 at the input of a batch norm over 128 × 32 × 32 entries already does). The normalisation keeps S_t
independent of the step size and the gradient's size, which change by orders of magnitude over a run (a cosine
schedule ends near lr 0), faster than a dynamic scale follows; what is left for S_t to find is how large a
tangent the network and batch allow. `update()` decides over every worker at once whether the meta update may
proceed (one all-reduce of two flags, fp16 only) and backs off the scale that overflowed: S_g if the gradients
did (what follows them is garbage too, not the tangent's fault), else S_t.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metacorrect.methods.engine.rows import distributed

INIT_SCALE = 2.0 ** 16  # GradScaler's default: a power of two, so scaling and unscaling are exact
INIT_TANGENT_SCALE = 1.0  # the largest tangent entry; the JVP through batch norm overflows far sooner (see above)
GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0, 0.5, 2000  # GradScaler's defaults


def upcast(loss: Tensor) -> Tensor:
    """A float16 loss (a sum of autocast's float16 outputs, e.g. a soft-target CE) in float32 before it is scaled:
    S · loss must not overflow where the loss itself does not."""
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


@dataclass
class DynamicScale:
    """One dynamic loss scale: halved after an overflow, doubled after `growth_interval` finite updates."""

    value: float
    growth_factor: float = GROWTH_FACTOR
    backoff_factor: float = BACKOFF_FACTOR
    growth_interval: int = GROWTH_INTERVAL
    growth_tracker: int = 0  # finite updates since the value last moved

    def update(self, finite: bool) -> None:
        if not finite:
            self.value *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.value *= self.growth_factor
            self.growth_tracker = 0


class MetaLossScale:
    """The dynamic loss scales of the meta passes (`grad`: S_g, `tangent`: S_t, see the module docstring): a
    GradScaler for meta updates with or without an optimizer (label tables, normalised weights, meta-models).

    Per meta update: the engine scales the losses it differentiates by S_g and `unscale_grads_` their gradients,
    multiplies the JVP's tangent by `normalise`'s factor; the method `unscale_`s its finished quantities (÷ that
    factor) and `update()` says whether to apply them. Switched off (fp32, bf16), both are 1, nothing is scaled
    and `update()` is True.
    """

    def __init__(self, enabled: bool = False, collective: Any = None, init_scale: float = INIT_SCALE,
                 init_tangent_scale: float = INIT_TANGENT_SCALE):
        self.enabled = bool(enabled)
        self.collective = collective
        self.grad = DynamicScale(float(init_scale) if self.enabled else 1.0)
        self.tangent = DynamicScale(float(init_tangent_scale) if self.enabled else 1.0)
        self.skipped = 0  # meta updates skipped, since the run began (checkpointed)
        # inf/NaN seen since the last update, [gradients, tangent side], kept as tensors (no host sync until then)
        self._bad: list[Tensor | None] = [None, None]
        self._factor: float | None = None  # this update's tangent factor (`normalise`)

    @property
    def grad_scale(self) -> float:
        return self.grad.value

    @property
    def tangent_scale(self) -> float:
        return self.tangent.value

    def scale(self, loss: Tensor) -> Tensor:
        """S_g · loss, for a loss the meta step differentiates by backward (`unscale_grads_` its gradient)."""
        return upcast(loss) * self.grad.value if self.enabled else loss

    def unscale_grads_(self, tensors: Iterable[Tensor | None]) -> None:
        """In place: each gradient of an S_g-scaled loss / S_g, inf or NaN remembered for `update`."""
        self._unscale(tensors, 0, self.grad.value)

    def normalise(self, grads: dict[str, Tensor], steps: Sequence[dict[str, float]]) -> float:
        """The factor c of this update's tangents c · steps[τ] ⊙ grads: S_t / max_{τ,n} |steps[τ][n]| ·
        max|grads[n]|, rounded down to a power of two so that scaling and unscaling are exact (remembered for
        `unscale_`). The same on every worker when `grads` is averaged over workers; S_t alone when the
        tangents are all zero or not finite (then `update` skips anyway)."""
        if not self.enabled:
            return 1.0
        names = [n for n in grads if grads[n].numel()]
        largest = torch.stack([grads[n].detach().abs().max().to(torch.float64) for n in names]).tolist() \
            if names else []
        top = max((abs(step.get(n, 0.0)) * g for n, g in zip(names, largest) for step in steps), default=0.0)
        self._factor = self.tangent.value
        if 0.0 < top < math.inf:
            self._factor = 2.0 ** math.floor(math.log2(self.tangent.value / top))
        return self._factor

    def unscale_(self, tensors: Iterable[Tensor | None]) -> None:
        """In place: each finished meta quantity (carrying the tangent factor) / that factor, inf or NaN
        remembered for `update`."""
        self._unscale(tensors, 1, self.tangent.value if self._factor is None else self._factor)

    def finish(self, tensors: Iterable[Tensor | None]) -> bool:
        """`unscale_` the meta update's finished quantities, then `update()`: True when they are finite on every
        worker (apply them), False when the step is to be skipped."""
        self.unscale_(tensors)
        return self.update()

    def _unscale(self, tensors: Iterable[Tensor | None], slot: int, value: float) -> None:
        if not self.enabled:
            return
        for t in tensors:
            if t is None:
                continue
            t.div_(value)
            bad = ~torch.isfinite(t).all()
            self._bad[slot] = bad if self._bad[slot] is None else self._bad[slot] | bad

    def update(self) -> bool:
        """True when everything unscaled since the last update is finite on every worker (apply the meta
        update); False otherwise (skip it: the scale that overflowed backs off and the skip is counted). Every
        worker calls it at the same point of a step: it all-reduces two flags."""
        if not self.enabled:
            return True
        device = next((b.device for b in self._bad if b is not None), torch.device("cpu"))
        flags = torch.stack([torch.zeros((), dtype=torch.bool, device=device) if b is None else b.to(device)
                             for b in self._bad]).to(torch.float32)
        self._bad, self._factor = [None, None], None
        if distributed(self.collective):
            flags = self.collective.sum(flags.to(self.collective.device))
        grad_bad, tangent_bad = (bool(v > 0) for v in flags.tolist())
        self.grad.update(not grad_bad)
        if not grad_bad:  # after an overflowed gradient the tangent was garbage through no fault of its own
            self.tangent.update(not tangent_bad)
        finite = not (grad_bad or tangent_bad)
        self.skipped += 0 if finite else 1
        return finite

    def state_dict(self) -> dict[str, Any]:
        return {"grad": vars(self.grad).copy(), "tangent": vars(self.tangent).copy(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad, self.tangent = DynamicScale(**state["grad"]), DynamicScale(**state["tangent"])
        self.skipped = int(state["skipped"])
        self._bad, self._factor = [None, None], None


class LossScales:
    """A method's two loss scales under fp16 (`real`: torch's GradScaler; `meta`: a MetaLossScale), both off
    otherwise (`real` None, `meta` switched off)."""

    def __init__(self, enabled: bool, device: torch.device | str, collective: Any = None):
        self.enabled = bool(enabled)
        self.collective = collective
        self.real = torch.amp.GradScaler(torch.device(device).type) if self.enabled else None
        self.meta = MetaLossScale(self.enabled, collective)
        self.skipped_real = 0  # real steps skipped, since the run began (checkpointed)

    @classmethod
    def for_precision(cls, precision: str, device: torch.device | str, collective: Any = None) -> LossScales:
        """On for `fp16` only: bf16 has fp32's exponent range and needs no scale."""
        return cls(precision == "fp16", device, collective)

    def real_step(self, optimizer: torch.optim.Optimizer, loss: Tensor, grads: Callable[[], Sequence[Tensor]],
                  weight: float) -> bool:
        """Backward of S·loss, `grads()` averaged over workers by `weight`, then unscale, check and step (or
        skip). Returns whether the optimizer stepped."""
        assert self.real is not None, "real_step needs fp16's GradScaler"
        self.real.scale(upcast(loss)).backward()
        tensors = list(grads())
        if weight == 0 and distributed(self.collective):
            for g in tensors:
                g.zero_()
        if distributed(self.collective):
            self.collective.weighted_mean_(tensors, weight)
        before = self.real.get_scale()
        self.real.step(optimizer)
        self.real.update()
        stepped = self.real.get_scale() >= before  # GradScaler lowers its scale exactly when it skipped
        self.skipped_real += 0 if stepped else 1
        return stepped

    def metrics(self) -> dict[str, float]:
        """Totals since the run began and the current scales (fp16 only; identical on every worker)."""
        if not self.enabled:
            return {}
        assert self.real is not None
        return {"fp16_skipped_steps": float(self.skipped_real), "fp16_skipped_meta_steps": float(self.meta.skipped),
                "fp16_loss_scale": float(self.real.get_scale()), "fp16_meta_grad_scale": self.meta.grad.value,
                "fp16_meta_tangent_scale": self.meta.tangent.value}

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        assert self.real is not None
        return {"real": self.real.state_dict(), "meta": self.meta.state_dict(), "skipped_real": self.skipped_real}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.real is not None
        self.real.load_state_dict(state["real"])
        self.meta.load_state_dict(state["meta"])
        self.skipped_real = int(state["skipped_real"])
