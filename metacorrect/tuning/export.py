"""The per-sample export of a trained run, in the form cleanlab and similar tools read directly.

One row per noisy-train id, sorted by id:

    id               int64    the sample's id in the prepared data set
    given_label      int64    its (noisy) label as given to every method
    pred_probs       list<float32>, C entries summing to 1: the final model's softmax
    corrected_label  int64    the method's corrected label (label-correcting methods only; else the column is absent)
    true_label       int64    the clean label where the data set knows it (-1 where it does not)

    import pandas as pd, numpy as np
    df = pd.read_parquet("predictions.parquet")
    cleanlab.filter.find_label_issues(df.given_label.to_numpy(), np.stack(df.pred_probs))

The probabilities are the trained model's on its own training samples (not out-of-fold); cleanlab's
documentation asks for out-of-sample ones, so treat these as a method's view of its noisy set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metacorrect.config import ExperimentConfig

BATCH = 1024


def export_predictions(cfg: ExperimentConfig, checkpoint_dir: str | Path, data_dir: str | Path,
                       out: str | Path) -> Path:
    """Write the export of the run whose checkpoint is `checkpoint_dir` to `out` (atomically); returns `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from metacorrect.datasets.contract import read_meta, split_files
    from metacorrect.datasets.stream import decode_batch
    from metacorrect.methods.backbones import build_backbone
    from metacorrect.platform import checkpoint as ckpt
    from metacorrect.platform.batches import Normaliser

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    meta = read_meta(data_dir)
    model = build_backbone(cfg.model.arch, meta.num_classes, meta.image_shape, cfg.model.width)
    model.load_state_dict(torch.load(checkpoint_dir / ckpt.MODEL_FILE, map_location="cpu", weights_only=True))
    model.eval()
    norm = Normaliser.from_meta(meta, torch.device("cpu"))
    ids, given, true, probs = [], [], [], []
    for file in split_files(data_dir, "noisy_train"):
        parquet = pq.ParquetFile(file)
        for batch in parquet.iter_batches(batch_size=BATCH, columns=["id", "image", "label", "true_label"]):
            rows = decode_batch({k: batch.column(k).to_numpy(zero_copy_only=False) for k in batch.schema.names},
                                meta.encoding, tuple(meta.image_shape))
            with torch.no_grad():
                logits = model(norm(torch.from_numpy(np.array(rows["image"]))))  # a writable copy
            probs.append(torch.softmax(logits.double(), dim=1).float().numpy())
            ids.append(rows["id"])
            given.append(rows["label"])
            true.append(rows["true_label"])
    order = np.argsort(np.concatenate(ids), kind="stable")
    p = np.concatenate(probs)[order]
    columns = {"id": np.concatenate(ids)[order], "given_label": np.concatenate(given)[order],
               "pred_probs": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1)), meta.num_classes)}
    corrected = checkpoint_dir / ckpt.CORRECTED_FILE
    if corrected.is_file():
        table = pq.read_table(corrected, columns=["id", "corrected_label"]).to_pandas().set_index("id")
        columns["corrected_label"] = table["corrected_label"].reindex(columns["id"]).to_numpy().astype(np.int64)
    columns["true_label"] = np.concatenate(true)[order]
    scratch = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), scratch)
    scratch.replace(out)
    return out
