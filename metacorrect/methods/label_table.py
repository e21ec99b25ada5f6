"""Per-sample learnable labels, one row per noisy id, replicated on every worker (README "Learned labels").

The table holds the label parameters of MSLG (logits y^d) and of instance-level meta soft labels: a
(num_noisy, C) float32 tensor on the training device, indexed by the dense `id` of the data contract.
Rows are created the first time their id is seen, from that sample's noisy label (`init_row`), so no
pass over the labels is needed before training (every id is seen in the first epoch).

Within a step workers hold disjoint ids. A method computes the new rows of its own batch, then
`update(ids, rows)` all-gathers (ids, rows) from every worker and writes them into every replica with
one `index_copy_`: replicas stay bit-identical, and no full-size temporary is made (Clothing1M: 1M × 14
float32 = 56 MB, updated in place). The table, its `seen` mask and the noisy label of every row are part
of the method's checkpoint; `to_parquet` exports it at the end of a run.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

RowInit = Callable[[Tensor, int], Tensor]  # (noisy labels (n,), num_classes) -> initial rows (n, C)


class LabelTable:
    """A (num_rows, num_classes) table of label parameters kept identical on every worker."""

    def __init__(self, num_rows: int, num_classes: int, init_row: RowInit, collective: Any,
                 device: torch.device | str = "cpu"):
        if num_rows <= 0 or num_classes <= 1:
            raise ValueError(f"label table: need num_rows > 0 and num_classes > 1, got {num_rows} x {num_classes}")
        self.num_classes = num_classes
        self.init_row = init_row
        self.collective = collective
        self.values = torch.zeros(num_rows, num_classes, dtype=torch.float32, device=device)
        self.seen = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.noisy_label = torch.full((num_rows,), -1, dtype=torch.int16, device=device)

    def __len__(self) -> int:
        return self.values.shape[0]

    def _check_ids(self, ids: Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"label table: ids must be in [0, {len(self)}), got {int(ids.min())}..{int(ids.max())}")

    def rows(self, ids: Tensor, noisy_label: Tensor) -> Tensor:
        """The current rows of `ids` (a copy, (n, C)); rows never seen are initialised from `noisy_label`.

        First sight is local (this worker's ids only); the initial rows are a pure function of the noisy
        label, so replicas agree once `update` has shared the batch's rows.
        """
        ids = ids.to(self.values.device)
        self._check_ids(ids)
        out = self.values.index_select(0, ids)
        fresh = ~self.seen.index_select(0, ids)
        if bool(fresh.any()):
            labels = noisy_label.to(self.values.device)
            out[fresh] = self.init_row(labels[fresh], self.num_classes).to(out.dtype)
        return out

    @torch.no_grad()
    def update(self, ids: Tensor, new_rows: Tensor, noisy_label: Tensor) -> int:
        """Write this worker's new rows and every other worker's (all-gathered) into the table, in place.

        Returns the number of rows written on this replica (the global batch's row count).
        """
        device = self.values.device
        ids = ids.to(device=device, dtype=torch.int64)
        self._check_ids(ids)
        if new_rows.shape != (len(ids), self.num_classes):
            raise ValueError(f"label table: rows have shape {tuple(new_rows.shape)}, expected ({len(ids)}, "
                             f"{self.num_classes})")
        # One gather of (id, label, row) packed in float64 (exact for ids < 2^53 and for float32 values).
        packed = torch.cat([ids.to(torch.float64).unsqueeze(1), noisy_label.to(device, torch.float64).unsqueeze(1),
                            new_rows.detach().to(device, torch.float64)], dim=1)
        packed = self.collective.all_gather(packed)
        all_ids = packed[:, 0].to(torch.int64)
        self.values.index_copy_(0, all_ids, packed[:, 2:].to(self.values.dtype))
        self.noisy_label.index_copy_(0, all_ids, packed[:, 1].to(torch.int16))
        self.seen.index_fill_(0, all_ids, True)
        return len(all_ids)

    # ---- checkpoint and export ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.cpu(), "seen": self.seen.cpu(), "noisy_label": self.noisy_label.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = state["values"]
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"label table: checkpoint holds {tuple(values.shape)}, this run needs "
                             f"{tuple(self.values.shape)} (a different data set?)")
        self.values.copy_(values)
        self.seen.copy_(state["seen"])
        self.noisy_label.copy_(state["noisy_label"])

    def to_parquet(self, to_probs: Callable[[Tensor], Tensor], top_k: int = 3, chunk: int = 65536) -> bytes:
        """id, noisy_label, top-k soft label (classes and probabilities), argmax, entropy (nats), one row per id.

        to_probs maps stored rows to label distributions (e.g. softmax of MSLG's logits). Rows never seen
        (only possible for a run stopped inside its first epoch) carry argmax -1 and null probabilities.
        """
        k = min(top_k, self.num_classes)
        n = len(self)
        top_cls = np.full((n, k), -1, dtype=np.int16)
        top_p = np.full((n, k), np.nan, dtype=np.float32)
        entropy = np.full(n, np.nan, dtype=np.float32)
        for start in range(0, n, chunk):  # bounded temporaries for 1M-row tables
            probs = to_probs(self.values[start:start + chunk].float())
            p, c = probs.topk(k, dim=1)
            top_cls[start:start + chunk] = c.cpu().numpy()
            top_p[start:start + chunk] = p.cpu().numpy()
            entropy[start:start + chunk] = (-(probs * probs.clamp_min(1e-12).log()).sum(1)).cpu().numpy()
        seen = self.seen.cpu().numpy()
        top_cls[~seen], top_p[~seen], entropy[~seen] = -1, np.nan, np.nan
        columns = {"id": pa.array(np.arange(n, dtype=np.int64)),
                   "noisy_label": pa.array(self.noisy_label.cpu().numpy())}
        for j in range(k):
            columns[f"top{j + 1}_label"] = pa.array(top_cls[:, j])
            columns[f"top{j + 1}_prob"] = pa.array(top_p[:, j], from_pandas=True)
        columns["argmax"] = pa.array(top_cls[:, 0])
        columns["entropy"] = pa.array(entropy, from_pandas=True)
        sink = io.BytesIO()
        pq.write_table(pa.table(columns), sink)
        return sink.getvalue()


def onehot_logits(scale: float) -> RowInit:
    """MSLG's init: y^d = K · onehot(ỹ)."""
    def init(labels: Tensor, num_classes: int) -> Tensor:
        return scale * torch.nn.functional.one_hot(labels.long(), num_classes).float()
    return init


def mass_logits(p0: float) -> RowInit:
    """Log-probabilities of mass p0 on the given class and (1 − p0)/(C − 1) on each other class
    (instance soft labels; softmax of these rows is exactly that distribution)."""
    def init(labels: Tensor, num_classes: int) -> Tensor:
        rest = math.log(max((1.0 - p0) / (num_classes - 1), 1e-12))
        rows = torch.full((len(labels), num_classes), rest)
        rows[torch.arange(len(labels)), labels.long().cpu()] = math.log(max(p0, 1e-12))
        return rows.to(labels.device)
    return init
