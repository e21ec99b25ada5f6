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
    rows: dict[str, Tensor] | None  # id, noisy_label, corrected_label, confidence of every worker (when exported)


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


@torch.no_grad()
def evaluate_noisy(method, shard, norm: Normaliser, collective: Collective, batch_size: int, num_classes: int,
                   device: torch.device, corrected: bool = False,
                   export: bool = False) -> tuple[dict[str, float], CorrectedLabels | None]:
    """On the noisy split, where true labels are known: the model's label recovery and memorisation of the
    corrupted labels; with `corrected`, how often the argmax of `method.soft_labels` is the true class
    (overall and among the corrupted samples), and with `export` every row, gathered on every worker."""
    model = method.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(12, dtype=torch.float64, device=device)  # 8 prediction sums + 4 corrected-label sums
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    rows: dict[str, list[Tensor]] = {"id": [], "noisy_label": [], "corrected_label": [], "confidence": []}
    for raw in iterate(shard, batch_size, device):
        batch, true = to_batch(raw, norm)
        sums[:8] += _prediction_sums(model(batch.x), batch.label, true)
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
    if not corrected:
        return metrics, None
    if c_known:
        metrics["corrected_accuracy"] = c_right / c_known
    if c_corrupted:
        metrics["corrected_accuracy_corrupted"] = c_fixed / c_corrupted
    gathered = None
    if export:
        empty = {"confidence": torch.float32}
        gathered = {k: collective.all_gather(torch.cat(v) if v else
                                             torch.zeros(0, dtype=empty.get(k, torch.long), device=device))
                    for k, v in rows.items()}
    return metrics, CorrectedLabels(collective.sum(confusion), gathered)
