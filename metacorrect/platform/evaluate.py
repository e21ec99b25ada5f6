"""Evaluation of the student on a split shard; counts are summed over workers before dividing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacorrect.platform.batches import Normaliser, iterate, to_batch
from metacorrect.platform.collective import Collective


@torch.no_grad()
def evaluate(model: nn.Module, shard, norm: Normaliser, collective: Collective, batch_size: int,
             device: torch.device, prefix: str, noisy_split: bool = False) -> dict[str, float]:
    """Accuracy and loss against `label`; on the noisy split, agreement with the true labels
    (label recovery of the model) and memorisation of the corrupted labels, where true labels are known."""
    was_training = model.training
    model.eval()
    # sums: n, loss, correct(label), known, correct(true), corrupted, recovered(corrupted), memorised(corrupted)
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for raw in iterate(shard, batch_size, device):
        batch, true = to_batch(raw, norm)
        logits = model(batch.x)
        pred = logits.argmax(1)
        known = true >= 0
        corrupted = known & (true != batch.label)
        sums += torch.stack([
            torch.tensor(float(len(batch)), device=device),
            F.cross_entropy(logits, batch.label, reduction="sum").double(),
            (pred == batch.label).sum().double(),
            known.sum().double(),
            (known & (pred == true)).sum().double(),
            corrupted.sum().double(),
            (corrupted & (pred == true)).sum().double(),
            (corrupted & (pred == batch.label)).sum().double(),
        ])
    model.train(was_training)
    n, loss, correct, known, recovered, corrupted, rec_corr, mem_corr = collective.sum(sums).tolist()
    if n == 0:
        return {}
    if not noisy_split:
        return {f"{prefix}_accuracy": correct / n, f"{prefix}_loss": loss / n}
    out = {f"{prefix}_fit_given": correct / n}  # predictions that agree with the labels trained on
    if known:
        out[f"{prefix}_recovery"] = recovered / known
    if corrupted:
        out[f"{prefix}_recovery_corrupted"] = rec_corr / corrupted
        out[f"{prefix}_memorised_corrupted"] = mem_corr / corrupted
    return out


@dataclass
class CorrectedLabels:
    """What a method believes about the noisy set, measured against the true labels (platform only)."""

    metrics: dict[str, float]
    confusion: Tensor  # (C, C) counts of (true label, corrected label) over rows with known true labels
    rows: dict[str, Tensor] | None  # id, noisy_label, corrected_label, confidence of this worker (when exported)


@torch.no_grad()
def evaluate_corrected(method, shard, norm: Normaliser, collective: Collective, batch_size: int, num_classes: int,
                       device: torch.device, export: bool = False) -> CorrectedLabels:
    """Argmax of `method.soft_labels` over the noisy set: how often it is the true class (overall and among
    the corrupted samples); optionally every row, gathered on every worker, for export."""
    was_training = method.model.training
    method.model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # known, corrected right, corrupted, fixed
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    rows: dict[str, list[Tensor]] = {"id": [], "noisy_label": [], "corrected_label": [], "confidence": []}
    for raw in iterate(shard, batch_size, device):
        batch, true = to_batch(raw, norm)
        soft = method.soft_labels(batch)
        confidence, corrected = soft.max(1)
        known = true >= 0
        corrupted = known & (true != batch.label)
        sums += torch.stack([known.sum(), (known & (corrected == true)).sum(), corrupted.sum(),
                             (corrupted & (corrected == true)).sum()]).double()
        confusion.index_put_((true[known], corrected[known]), torch.ones_like(true[known], dtype=torch.float64),
                             accumulate=True)
        if export:
            for key, value in (("id", batch.ids), ("noisy_label", batch.label), ("corrected_label", corrected),
                               ("confidence", confidence.float())):
                rows[key].append(value)
    method.model.train(was_training)
    known, right, corrupted, fixed = collective.sum(sums).tolist()
    metrics = {}
    if known:
        metrics["corrected_accuracy"] = right / known
    if corrupted:
        metrics["corrected_accuracy_corrupted"] = fixed / corrupted
    out_rows = None
    if export:
        empty = {"confidence": torch.float32}
        out_rows = {k: collective.all_gather(torch.cat(v) if v else
                                             torch.zeros(0, dtype=empty.get(k, torch.long), device=device))
                    for k, v in rows.items()}
    return CorrectedLabels(metrics, collective.sum(confusion), out_rows)
