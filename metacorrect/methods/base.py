"""The method interface (README "How a run works"): one training iteration on a noisy and a clean batch.

A method sees ids, inputs and the labels it may use; true labels never reach it (the platform keeps
them for metrics). Gradients go through `self.collective`, so a method is written once for 1..N workers.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metacorrect.config import ExperimentConfig, MethodConfig


@dataclass
class Batch:
    ids: Tensor  # int64 dense ids of the split (noisy ids index per-sample state)
    x: Tensor  # model input, float (N, C, H, W), on the training device
    label: Tensor  # int64 labels the method may use: noisy in noisy_train, clean elsewhere
    weight: float  # rows that count towards averages: len(ids), or 0 for a stand-in batch
    views: Tensor | None = None  # (K, N, C, H, W) strongly augmented views, for methods that ask (Method.strong_views)

    def __len__(self) -> int:
        return len(self.ids)


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
    """Base class; subclasses set `name`, `config_class` and implement `step`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Strongly augmented views of each noisy batch that the platform makes on the worker (Batch.views).
    strong_views: int = 0
    strong_augment: str = "randaugment"  # one of datasets.stream.STRONG_AUGMENTS

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 num_classes: int, num_noisy: int, collective: Any,
                 image_shape: tuple[int, int, int] | None = None):
        self.cfg = cfg
        self.image_shape = image_shape  # (H, W, C) of the data set, for methods that build their own networks
        self.mcfg = cfg.method
        self.model = model
        self.optimizer = optimizer
        self.num_classes = num_classes
        self.num_noisy = num_noisy
        self.collective = collective
        self.meta_clock = MetaClock()

    def meta_phase(self) -> contextlib.AbstractContextManager:
        """Wrap the meta part of `step` in this (its time is the `step/meta_share` metric)."""
        return self.meta_clock(next(self.model.parameters()).device)

    def step(self, noisy: Batch, clean: Batch) -> dict[str, float]:
        raise NotImplementedError

    def soft_labels(self, noisy: Batch) -> Tensor:
        """What the method now believes the labels of `noisy` are, (N, C) rows summing to 1."""
        return nn.functional.one_hot(noisy.label, self.num_classes).float()

    def sample_weights(self, noisy: Batch) -> Tensor | None:
        """Per-sample training weights the method would give `noisy` now, (N,); None: not a reweighting method.
        The platform joins them with the true labels (clean vs corrupted) in its noisy-set evaluation."""
        return None

    @property
    def weights_samples(self) -> bool:
        return type(self).sample_weights is not Method.sample_weights

    def eval_models(self) -> dict[str, nn.Module]:
        """Further models to evaluate each epoch beside the student, by name (e.g. IEG's EMA weights):
        their val/test metrics are logged as `<name>_val_accuracy`, `<name>_test_accuracy`, ..."""
        return {}

    @property
    def corrects_labels(self) -> bool:
        """True for methods whose `soft_labels` is more than the given labels (evaluated and exported)."""
        return type(self).soft_labels is not Method.soft_labels

    def start_epoch(self, epoch: int) -> None:
        """Called by the platform before each epoch's first step (0-based; warm-up schedules use it)."""

    def export_files(self) -> dict[str, bytes]:
        """Files for the run's final checkpoint and MLflow artifacts (e.g. a label table as parquet),
        keyed by their path relative to the checkpoint. Called on rank 0 after the last epoch."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- shared pieces ----------------------------------------------------------------------------
    def optimizer_step(self, loss: Tensor, weight: float) -> None:
        """Backward, average gradients over workers weighted by rows that count, one optimizer step."""
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.collective.weighted_mean_(grads_of(self.model), weight)
        self.optimizer.step()


def grads_of(model: nn.Module) -> list[Tensor]:
    """Every trainable parameter's gradient (zeros where autograd produced none), same order on every worker."""
    out = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out
