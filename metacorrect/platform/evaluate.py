"""Evaluation of the student on a split shard; counts are summed over workers before dividing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
