"""One per-sample table, one row per noisy id, replicated on every worker: learned labels or sample weights.

- labels (MSLG's logits y^d, instance-level meta soft labels): (num_noisy, C) float32 parameters. Rows are
  created the first time their id is seen, from that sample's noisy label (`init_row`), so no pass over the
  labels is needed before training (every id is seen in the first epoch).
- weights (L2RW, IEG): (num_noisy,) the weight each id got the last time it was trained on (NaN before).

Within a step workers hold disjoint ids. A method computes the new rows of its own batch, then `write`
all-gathers (id, noisy label, row) from every worker and writes them into every replica with one
`index_copy_`: replicas stay bit-identical and no full-size temporary is made (Clothing1M: 1M × 14 float32 =
56 MB, updated in place). The table is part of the method's checkpoint; `to_parquet` is its one export
(`Method.export_files`).
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor

RowInit = Callable[[Tensor, int], Tensor]  # (noisy labels (n,), num_classes) -> initial rows (n, C)
Kind = Literal["labels", "weights"]
FILES = {"labels": "label_table.parquet", "weights": "weight_table.parquet"}


class SampleTable:
    """Per-id rows kept identical on every worker: (num_rows, C) label parameters or (num_rows,) weights."""

    def __init__(self, kind: Kind, num_rows: int, collective: Any, device: torch.device | str = "cpu", *,
                 num_classes: int = 0, init_row: RowInit | None = None,
                 to_probs: Callable[[Tensor], Tensor] = lambda v: F.softmax(v, dim=1)):
        if kind not in FILES:
            raise ValueError(f"sample table: kind must be one of {', '.join(FILES)}, got '{kind}'")
        if num_rows <= 0 or (kind == "labels" and (num_classes <= 1 or init_row is None)):
            raise ValueError(f"sample table: need num_rows > 0 (and for labels num_classes > 1 and init_row), "
                             f"got {num_rows} x {num_classes}")
        self.kind, self.num_classes, self.init_row, self.to_probs = kind, num_classes, init_row, to_probs
        self.collective = collective
        shape = (num_rows, num_classes) if kind == "labels" else (num_rows,)
        fill = 0.0 if kind == "labels" else float("nan")
        self.values = torch.full(shape, fill, dtype=torch.float32, device=device)
        self.seen = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.noisy_label = torch.full((num_rows,), -1, dtype=torch.int16, device=device)

    @property
    def file_name(self) -> str:
        return FILES[self.kind]

    def __len__(self) -> int:
        return self.values.shape[0]

    def _check_ids(self, ids: Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"sample table: ids must be in [0, {len(self)}), got {int(ids.min())}..{int(ids.max())}")

    def read(self, ids: Tensor, noisy_label: Tensor | None = None) -> Tensor:
        """The current rows of `ids` (a copy, on the ids' device). Label rows never seen are initialised from
        `noisy_label` (first sight is local; the initial rows are a pure function of the noisy label, so
        replicas agree once `write` has shared the batch); weights never written are NaN."""
        target = ids.device
        ids = ids.to(self.values.device)
        self._check_ids(ids)
        out = self.values.index_select(0, ids)
        if self.kind == "labels":
            fresh = ~self.seen.index_select(0, ids)
            if bool(fresh.any()):
                if noisy_label is None:
                    raise ValueError("sample table: reading label rows needs the noisy labels of unseen ids")
                out[fresh] = self.init_row(noisy_label.to(self.values.device)[fresh], self.num_classes).to(out.dtype)
        return out.to(target)

    @torch.no_grad()
    def write(self, ids: Tensor, rows: Tensor, noisy_label: Tensor, counts: bool = True) -> int:
        """Write this worker's rows and every other worker's (all-gathered) into the table, in place.

        counts=False (a stand-in batch) writes nothing from this worker but still joins the gather. Returns
        the number of rows written on this replica (the global batch's row count).
        """
        device = self.values.device
        if not counts:
            ids, rows, noisy_label = ids[:0], rows[:0], noisy_label[:0]
        ids = ids.to(device=device, dtype=torch.int64)
        self._check_ids(ids)
        expected = (len(ids),) + tuple(self.values.shape[1:])
        if tuple(rows.shape) != expected:
            raise ValueError(f"sample table: rows have shape {tuple(rows.shape)}, expected {expected}")
        # One gather of (id, label, row) packed in float64 (exact for ids < 2^53 and for float32 values).
        width = self.num_classes if self.kind == "labels" else 1
        packed = torch.cat([ids.to(torch.float64).unsqueeze(1), noisy_label.to(device, torch.float64).unsqueeze(1),
                            rows.detach().to(device, torch.float64).reshape(len(ids), width)], dim=1)
        packed = self.collective.all_gather(packed)
        all_ids = packed[:, 0].to(torch.int64)
        self.values.index_copy_(0, all_ids, packed[:, 2:].to(self.values.dtype).reshape(
            (len(all_ids),) + tuple(self.values.shape[1:])))
        self.noisy_label.index_copy_(0, all_ids, packed[:, 1].to(torch.int16))
        self.seen.index_fill_(0, all_ids, True)
        return len(all_ids)

    # ---- checkpoint and export ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.cpu(), "seen": self.seen.cpu(), "noisy_label": self.noisy_label.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = state["values"]
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"sample table: checkpoint holds {tuple(values.shape)}, this run needs "
                             f"{tuple(self.values.shape)} (a different data set?)")
        self.values.copy_(values)
        self.seen.copy_(state["seen"])
        self.noisy_label.copy_(state["noisy_label"])

    def to_parquet(self, top_k: int = 3, chunk: int = 65536) -> bytes:
        """One row per id: id, noisy_label and, for labels, the top-k soft label (classes and probabilities),
        argmax and entropy (nats); for weights, the weight. Rows never written carry argmax -1 and nulls."""
        n = len(self)
        seen = self.seen.cpu().numpy()
        columns = {"id": pa.array(np.arange(n, dtype=np.int64)),
                   "noisy_label": pa.array(self.noisy_label.cpu().numpy())}
        if self.kind == "weights":
            columns["weight"] = pa.array(self.values.cpu().numpy(), from_pandas=True)
        else:
            columns |= self._label_columns(top_k, chunk, seen)
        sink = io.BytesIO()
        pq.write_table(pa.table(columns), sink)
        return sink.getvalue()

    def _label_columns(self, top_k: int, chunk: int, seen: np.ndarray) -> dict[str, pa.Array]:
        k = min(top_k, self.num_classes)
        n = len(self)
        top_cls = np.full((n, k), -1, dtype=np.int16)
        top_p = np.full((n, k), np.nan, dtype=np.float32)
        entropy = np.full(n, np.nan, dtype=np.float32)
        for start in range(0, n, chunk):  # bounded temporaries for 1M-row tables
            probs = self.to_probs(self.values[start:start + chunk].float())
            p, c = probs.topk(k, dim=1)
            top_cls[start:start + chunk] = c.cpu().numpy()
            top_p[start:start + chunk] = p.cpu().numpy()
            entropy[start:start + chunk] = (-(probs * probs.clamp_min(1e-12).log()).sum(1)).cpu().numpy()
        top_cls[~seen], top_p[~seen], entropy[~seen] = -1, np.nan, np.nan
        columns = {}
        for j in range(k):
            columns[f"top{j + 1}_label"] = pa.array(top_cls[:, j])
            columns[f"top{j + 1}_prob"] = pa.array(top_p[:, j], from_pandas=True)
        columns["argmax"] = pa.array(top_cls[:, 0])
        columns["entropy"] = pa.array(entropy, from_pandas=True)
        return columns


def onehot_logits(scale: float) -> RowInit:
    """Rows scale · onehot(ỹ) (MSLG's y^d init)."""
    def init(labels: Tensor, num_classes: int) -> Tensor:
        return scale * F.one_hot(labels.long(), num_classes).float()
    return init


def mass_logits(p0: float) -> RowInit:
    """Log-probabilities of mass p0 on the given class and (1 − p0)/(C − 1) on each other class (softmax of
    these rows is exactly that distribution)."""
    def init(labels: Tensor, num_classes: int) -> Tensor:
        rest = math.log(max((1.0 - p0) / (num_classes - 1), 1e-12))
        rows = torch.full((len(labels), num_classes), rest)
        rows[torch.arange(len(labels)), labels.long().cpu()] = math.log(max(p0, 1e-12))
        return rows.to(labels.device)
    return init
