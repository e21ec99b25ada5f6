"""The method interface: one training iteration on a noisy and a clean batch, and what every method shares.

A method sees ids, inputs and the labels it may use; true labels never reach it (the platform keeps them
for metrics). Gradients go through `self.collective`, so a method is written once for 1..N workers. A
method file imports only this module, `methods.table`, `methods.backbones` and `methods.engine`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.checks import AT_LEAST_ONE, COUNT, NON_NEGATIVE, POSITIVE, field_problems, one_of
from metacorrect.methods.engine import META_GRADS, LossScales

if TYPE_CHECKING:
    from metacorrect.config import ExperimentConfig
    from metacorrect.methods.table import SampleTable

# Method fields that keep their meaning across meta methods (carried over by `ExperimentConfig.for_method`).
ENGINE_FIELDS = ("k", "meta_grad")


@dataclass
class MethodConfig:
    """Base of every method's config; each method subclasses it with its own fields.

    `search_space` is the method's default Ray Tune space for `metacorrect sweep` (dotted field -> spec,
    syntax in `metacorrect/tuning/space.py`); `renamed` maps a field's old name to its new one, so an old
    config gets an error that names the new field.
    """

    name: str = "erm"
    search_space: ClassVar[dict[str, Any]] = {"optim.lr": {"loguniform": [0.005, 0.2]}}
    renamed: ClassVar[dict[str, str]] = {}

    def validate(self) -> list[str]:
        return []


@dataclass
class Batch:
    ids: Tensor  # int64 dense ids of the split (noisy ids index per-sample state)
    x: Tensor  # model input, float (N, C, H, W), on the training device
    label: Tensor  # int64 labels the method may use: noisy in noisy_train, clean elsewhere
    weight: float  # rows that count towards averages: len(ids), or 0 for a stand-in batch
    views: Tensor | None = None  # (K, N, C, H, W) strongly augmented views, for methods that declare strong_views

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class MethodContext:
    """What the platform hands a method at construction."""

    cfg: ExperimentConfig
    model: nn.Module  # the student
    optimizer: torch.optim.Optimizer  # the student's SGD
    num_classes: int
    num_noisy: int  # rows of the noisy training split (ids 0..num_noisy-1)
    collective: Any  # platform.collective.Collective
    image_shape: tuple[int, int, int] | None = None  # (H, W, C), for methods that build their own networks


@dataclass(frozen=True)
class Capabilities:
    """What a method offers the platform beyond training, declared by the method."""

    corrects_labels: bool = False  # `soft_labels` is more than the given labels (evaluated and exported)
    weighs_samples: bool = False  # `sample_weights` gives per-sample weights (joined with corruption in evaluation)
    eval_models: bool = False  # `eval_models` returns further models to evaluate beside the student
    strong_views: bool = False  # noisy batches carry `views` (count: `Method.strong_views`)


class MetaClock:
    """Wall seconds a method spends in its meta step (look-ahead, meta-gradient, meta-model or table update), so
    the platform can log the meta step's share of step time. On a GPU the device is synchronised at both ends,
    so queued kernels count where they belong."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - started


class Method:
    """Base class; subclasses declare `name`, `config` and `capabilities` as class arguments and implement `step`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    strong_views: int = 0  # strongly augmented views per noisy image the platform makes (Batch.views)
    strong_augment: str = "randaugment"  # one of datasets.stream.STRONG_AUGMENTS

    def __init_subclass__(cls, *, name: str | None = None, config: type[MethodConfig] | None = None,
                          capabilities: Capabilities | None = None, **kwargs: Any) -> None:
        """`class MLC(Method, name="mlc", config=MLCConfig, capabilities=Capabilities(corrects_labels=True))`."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        if config is not None:
            cls.config_class = config
        if capabilities is not None:
            cls.capabilities = capabilities

    def __init__(self, ctx: MethodContext):
        self.cfg = ctx.cfg
        self.mcfg = ctx.cfg.method
        self.model = ctx.model
        self.optimizer = ctx.optimizer
        self.num_classes = ctx.num_classes
        self.num_noisy = ctx.num_noisy
        self.collective = ctx.collective
        self.image_shape = ctx.image_shape
        self.table: SampleTable | None = None  # the method's per-sample table, if it keeps one
        self.meta_clock = MetaClock()
        # fp16's loss scales (real step and meta passes), switched off for fp32 and bf16; the platform keeps
        # their state in checkpoints beside `state_dict` and logs their skipped-step counts.
        self.loss_scales = LossScales.for_precision(ctx.cfg.train.precision, self.device, self.collective)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def meta_phase(self) -> contextlib.AbstractContextManager:
        """Wrap the meta part of `step` in this (its time is the `step/meta_share` metric)."""
        return self.meta_clock(self.device)

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        raise NotImplementedError

    def soft_labels(self, noisy: Batch) -> Tensor:
        """What the method now believes the labels of `noisy` are, (N, C) rows summing to 1."""
        return F.one_hot(noisy.label, self.num_classes).float()

    def sample_weights(self, noisy: Batch) -> Tensor | None:
        """Per-sample training weights the method would give `noisy` now, (N,) (capabilities.weighs_samples)."""
        return None

    def eval_models(self) -> dict[str, nn.Module]:
        """Further models to evaluate each epoch beside the student, by name (capabilities.eval_models):
        their val/test metrics are logged as `<name>_val_accuracy`, `<name>_test_accuracy`, ..."""
        return {}

    def start_epoch(self, epoch: int) -> None:
        """Called by the platform before each epoch's first step (0-based; warm-up schedules use it)."""

    def export_files(self) -> dict[str, bytes]:
        """The method's per-sample table as parquet, keyed by its path relative to the checkpoint (the run's
        final checkpoint and MLflow artifacts). Called on rank 0 after the last epoch."""
        return {} if self.table is None else {self.table.file_name: self.table.to_parquet()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- shared pieces ----------------------------------------------------------------------------
    def optimizer_step(self, loss: Tensor, weight: float) -> bool:
        """Backward, average gradients over workers weighted by rows that count, one optimizer step. Returns
        False when fp16's loss scale found the averaged gradients non-finite and skipped the step (the same on
        every worker); always True in fp32 and bf16."""
        self.optimizer.zero_grad(set_to_none=False)
        if self.loss_scales.real is not None:
            return self.loss_scales.real_step(self.optimizer, loss, lambda: grads_of(self.model), weight)
        loss.backward()
        self.collective.weighted_mean_(grads_of(self.model), weight)
        self.optimizer.step()
        return True

    def split_clean(self, clean: Batch) -> tuple[Batch, Batch | None]:
        """(meta batch, training half or None): with the method's `mix_clean` on, half of the clean batch joins
        the student's loss (`student_step`) and the other half is the meta batch."""
        return split_clean(clean, bool(getattr(self.mcfg, "mix_clean", False)))

    def student_step(self, loss: Tensor, noisy_weight: float, train: Batch | None) -> Tensor:
        """The real step on `loss` (the method's loss on the noisy rows), joined by the cross-entropy of the clean
        batch's training half when there is one (`split_clean`), each part in proportion to the rows that count.
        Returns the loss stepped on."""
        clean_ce = F.cross_entropy(self.model(train.x), train.label) if train is not None else None
        total, weight, _ = student_loss(loss, noisy_weight, clean_ce, train.weight if train is not None else 0.0)
        self.optimizer_step(total, weight)
        return total

    def sum_grads_over_workers(self, params: list[Tensor]) -> None:
        """Shared meta-parameters: each worker's .grad replaced by the sum over workers (one all-reduce)."""
        if not self.collective.distributed:
            return
        grads = [p.grad for p in params]
        flat = self.collective.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def grads_of(model: nn.Module) -> list[Tensor]:
    """Every trainable parameter's gradient (zeros where autograd produced none), same order on every worker."""
    out = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out


# ---- pieces the label-correcting meta-model methods (MLC, EMLC) share ---------------------------------
def meta_problems(cfg: Any, discounts: tuple[str, ...]) -> list[str]:
    """One line per problem of the fields a meta-model method has (k, meta_grad, discount, meta_lr, ...)."""
    return field_problems("method", cfg, {"k": COUNT, "meta_grad": one_of(META_GRADS),
                                          "discount": one_of(discounts), "meta_lr": POSITIVE,
                                          "meta_weight_decay": NON_NEGATIVE, "embed_dim": AT_LEAST_ONE,
                                          "hidden_dim": AT_LEAST_ONE})


def split_clean(clean: Batch, mix: bool) -> tuple[Batch, Batch | None]:
    """(meta part, train part): the first half (rounded up) evaluates, the rest joins the student's loss."""
    if not mix or len(clean) < 2:
        return clean, None
    m = (len(clean) + 1) // 2
    share = clean.weight / max(len(clean), 1)  # rows that count, per row (1, or 0 for a stand-in)

    def part(sl: slice) -> Batch:
        ids = clean.ids[sl]
        return Batch(ids=ids, x=clean.x[sl], label=clean.label[sl], weight=share * len(ids))

    return part(slice(0, m)), part(slice(m, None))


def student_loss(soft: Tensor, noisy_weight: float, clean_ce: Tensor | None, clean_weight: float
                 ) -> tuple[Tensor, float, float]:
    """(n_s·soft + n_c·clean)/(n_s + n_c) with rows that count; returns (loss, weight, scale of the soft term)."""
    total = noisy_weight + (clean_weight if clean_ce is not None else 0.0)
    if total <= 0:
        return soft * 0.0, 0.0, 0.0
    loss = soft * (noisy_weight / total)
    if clean_ce is not None:
        loss = loss + clean_ce * (clean_weight / total)
    return loss, total, noisy_weight / total


def any_nonzero_grad(params: list[Tensor]) -> bool:
    """False when every meta-gradient is exactly zero (all rows were stand-ins on every worker).

    The engine has already summed the meta-gradients over workers, so every replica decides alike.
    """
    return any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params)


def float_buffers(module: nn.Module) -> list[Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def engine_discount(k: int, discount: str) -> str:
    """The engine's discount of older steps for a config's `discount`; k = 1 has no older steps ("shrink" is then
    the plain one-step meta-gradient, and skips the projection's unused γ)."""
    return "shrink" if k == 1 else discount
