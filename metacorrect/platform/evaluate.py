"""Evaluation of the student (and a method's corrected labels) on a split shard.

Counts are summed over workers before dividing. The noisy set is read once per epoch: the model's
predictions and the method's corrected labels are measured in the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.platform.batches import Normaliser, iterate, to_batch
from metacorrect.platform.collective import Collective


@dataclass
class CorrectedLabels:
    """What a method believes about the noisy set, measured against the true labels (platform only)."""

    confusion: Tensor  # (C, C) counts of (true label, corrected label) over rows with known true labels
    rows: dict[str, Tensor] | None  # id, noisy_label, corrected_label, confidence of every row (rank 0, exported)


def _prediction_sums(logits: Tensor, label: Tensor, true: Tensor) -> Tensor:
    """n, loss, correct(label), known, correct(true), corrupted, recovered(corrupted), memorised(corrupted)."""
    pred = logits.argmax(1)
    known = true >= 0
    corrupted = known & (true != label)
    return torch.stack([
        torch.tensor(float(len(label)), device=logits.device),
        F.cross_entropy(logits, label, reduction="sum").double(),
        (pred == label).sum().double(), known.sum().double(), (known & (pred == true)).sum().double(),
        corrupted.sum().double(), (corrupted & (pred == true)).sum().double(),
        (corrupted & (pred == label)).sum().double(),
    ])


@torch.no_grad()
def evaluate(model: nn.Module, shard, norm: Normaliser, collective: Collective, batch_size: int,
             device: torch.device, prefix: str) -> dict[str, float]:
    """Accuracy and loss against `label` (clean splits)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for raw in iterate(shard, batch_size, device):
        batch, true = to_batch(raw, norm)
        sums += _prediction_sums(model(batch.x), batch.label, true)
    model.train(was_training)
    n, loss, correct = collective.sum(sums).tolist()[:3]
    return {f"{prefix}_accuracy": correct / n, f"{prefix}_loss": loss / n} if n else {}


@dataclass
class SampleWeights:
    """A reweighting method's per-sample weights on the noisy set, joined with the true labels (platform only)."""

    rows: dict[str, Tensor] | None  # id, noisy_label, weight, corrupted (uint8) of rows with known truth (rank 0)


def _weight_sums(method, batch, true: Tensor, sums: Tensor, rows: dict[str, list[Tensor]] | None,
                 measured: Tensor | None = None) -> None:
    """Adds Σ weight and count over the clean and the corrupted rows (of the `measured` rows only, when given);
    with `rows`, keeps every row of known truth."""
    weight = method.sample_weights(batch)
    if weight is None:
        return
    weight = weight.detach().to(torch.float64)
    known = (true >= 0) & ~weight.isnan()  # NaN: a row the method has no weight for yet
    corrupted = known & (true != batch.label)
    clean = known & ~corrupted
    if measured is not None:
        clean, corrupted_measured = clean & measured, corrupted & measured
    else:
        corrupted_measured = corrupted
    sums += torch.stack([weight[clean].sum(), clean.sum().double(), weight[corrupted_measured].sum(),
                         corrupted_measured.sum().double()])
    if rows is not None:
        for key, value in (("id", batch.ids[known]), ("noisy_label", batch.label[known]),
                           ("weight", weight[known].float()), ("corrupted", corrupted[known].to(torch.uint8))):
            rows[key].append(value)


@torch.no_grad()
def evaluate_noisy(method, shard, norm: Normaliser, collective: Collective, batch_size: int, num_classes: int,
                   device: torch.device, corrected: bool = False, export: bool = False, weights: bool = False,
                   counted: Tensor | None = None
                   ) -> tuple[dict[str, float], CorrectedLabels | None, SampleWeights | None]:
    """On the noisy split, where true labels are known: the model's label recovery and memorisation of the
    corrupted labels; with `corrected`, how often the argmax of `method.soft_labels` is the true class
    (overall and among the corrupted samples); with `weights`, the mean of `method.sample_weights` over the
    clean and over the corrupted rows; with `export`, every row of both, gathered on rank 0. `counted` (a
    mask over the noisy ids) restricts the metrics to those ids; the exports keep every row."""
    model = method.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(12, dtype=torch.float64, device=device)  # 8 prediction sums + 4 corrected-label sums
    weight_sums = torch.zeros(4, dtype=torch.float64, device=device)
    weight_rows: dict[str, list[Tensor]] | None = (
        {"id": [], "noisy_label": [], "weight": [], "corrupted": []} if weights and export else None)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    rows: dict[str, list[Tensor]] = {"id": [], "noisy_label": [], "corrected_label": [], "confidence": []}
    for raw in iterate(shard, batch_size, device):
        batch, true = to_batch(raw, norm)
        logits = model(batch.x)
        measured = None if counted is None else counted[batch.ids]
        if weights:
            _weight_sums(method, batch, true, weight_sums, weight_rows, measured)
        if measured is not None:  # the metrics see the measured rows only; the exports see every row
            logits, true = logits[measured], torch.where(measured, true, torch.full_like(true, -1))
        sums[:8] += _prediction_sums(logits, batch.label if measured is None else batch.label[measured],
                                     true if measured is None else true[measured])
        if not corrected:
            continue
        confidence, label = method.soft_labels(batch).max(1)
        known = true >= 0
        corrupted = known & (true != batch.label)
        sums[8:] += torch.stack([known.sum(), (known & (label == true)).sum(), corrupted.sum(),
                                 (corrupted & (label == true)).sum()]).double()
        confusion.index_put_((true[known], label[known]), torch.ones_like(true[known], dtype=torch.float64),
                             accumulate=True)
        if export:
            for key, value in (("id", batch.ids), ("noisy_label", batch.label), ("corrected_label", label),
                               ("confidence", confidence.float())):
                rows[key].append(value)
    model.train(was_training)
    (n, _, fit, known, recovered, corrupted, rec_corr, mem_corr,
     c_known, c_right, c_corrupted, c_fixed) = collective.sum(sums).tolist()
    metrics = {"noisy_fit_given": fit / n} if n else {}  # predictions that agree with the labels trained on
    if known:
        metrics["noisy_recovery"] = recovered / known
    if corrupted:
        metrics["noisy_recovery_corrupted"] = rec_corr / corrupted
        metrics["noisy_memorised_corrupted"] = mem_corr / corrupted
    sample_weights = None
    if weights:
        w_clean, n_clean, w_corrupted, n_corrupted = collective.sum(weight_sums).tolist()
        if n_clean:
            metrics["weight_mean_clean"] = w_clean / n_clean
        if n_corrupted:
            metrics["weight_mean_corrupted"] = w_corrupted / n_corrupted
        if weight_rows is not None:
            empty = {"weight": torch.float32, "corrupted": torch.uint8}
            table = {k: collective.gather_to_first(
                torch.cat(v) if v else torch.zeros(0, dtype=empty.get(k, torch.long), device=device))
                for k, v in weight_rows.items()}
            sample_weights = SampleWeights(table) if collective.rank == 0 else None
    if not corrected:
        return metrics, None, sample_weights
    if c_known:
        metrics["corrected_accuracy"] = c_right / c_known
    if c_corrupted:
        metrics["corrected_accuracy_corrupted"] = c_fixed / c_corrupted
    gathered = None
    if export:
        empty = {"confidence": torch.float32}
        gathered = {k: collective.gather_to_first(torch.cat(v) if v else
                                             torch.zeros(0, dtype=empty.get(k, torch.long), device=device))
                    for k, v in rows.items()}
    if gathered is not None and collective.rank != 0:
        gathered = None
    return metrics, CorrectedLabels(collective.sum(confusion), gathered), sample_weights
