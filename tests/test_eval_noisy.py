"""`train.eval_noisy: known` on a data set where only some noisy rows have a true label (as on Clothing1M): each
epoch measures a fixed, seeded subset of the known rows, the metrics equal a full pass restricted to those rows
(recomputed here from the epoch's checkpointed model), and the end-of-run exports still hold every noisy id."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow

MEASURED = 200


@pytest.fixture(scope="module")
def partly_known(digits_noisy, tmp_path_factory) -> Path:
    """digits-sym60 with the true label of every third noisy row unknown (-1)."""
    data = tmp_path_factory.mktemp("partly-known") / "data"
    shutil.copytree(digits_noisy, data)
    for shard in (data / "noisy_train").glob("part-*.parquet"):
        table = pq.read_table(shard)
        ids, true = table["id"].to_numpy(), table["true_label"].to_numpy().copy()
        true[ids % 3 == 0] = -1
        index = table.schema.get_field_index("true_label")
        field = table.schema.field(index)
        pq.write_table(table.set_column(index, field, pa.array(true, field.type)), shard)
    return data


def _noisy_rows(data: Path) -> dict[str, np.ndarray]:
    from metacorrect.datasets.contract import read_meta
    from metacorrect.datasets.stream import decode_batch

    meta = read_meta(data)
    parts = [pq.read_table(f).to_pydict() for f in sorted((data / "noisy_train").glob("part-*.parquet"))]
    columns = {k: np.concatenate([np.asarray(p[k], dtype=object if k == "image" else None) for p in parts])
               for k in ("id", "image", "label", "true_label")}
    return decode_batch(columns, meta.encoding, tuple(meta.image_shape))


def _recovery(model_file: Path, cfg: dict, data: Path, rows: dict[str, np.ndarray], ids: np.ndarray) -> float:
    from metacorrect.datasets.contract import read_meta
    from metacorrect.methods.backbones import build_backbone
    from metacorrect.platform.batches import Normaliser

    meta = read_meta(data)
    model = build_backbone(cfg["model"]["arch"], meta.num_classes, tuple(meta.image_shape), cfg["model"]["width"])
    model.load_state_dict(torch.load(model_file, weights_only=True))
    model.eval()
    pick = np.isin(rows["id"], ids)
    with torch.no_grad():
        x = Normaliser.from_meta(meta, torch.device("cpu"))(torch.from_numpy(rows["image"][pick]))
        pred = model(x).argmax(1).numpy()
    return float(np.mean(pred == rows["true_label"][pick]))


def test_known_measures_a_seeded_subset_equal_to_a_restricted_full_pass(ray_cluster, partly_known, experiment):
    from metacorrect.platform.trainer import EVAL_IDS_FILE, run

    cfg = experiment(partly_known, method__name="mslg", method__warmup_epochs=0, train__epochs=2,
                     train__eval_noisy="known", train__eval_noisy_max=MEASURED, resources__num_workers=0,
                     tracking__run_name="known")
    result = run(cfg, progress=False)
    run_dir = Path(result.run_dir)
    ids = np.load(run_dir / EVAL_IDS_FILE)
    rows = _noisy_rows(partly_known)
    truth = dict(zip(rows["id"].tolist(), rows["true_label"].tolist()))
    assert len(ids) == MEASURED and len(set(ids.tolist())) == MEASURED
    assert all(truth[i] >= 0 for i in ids.tolist()), "only rows whose true label is known are measured"

    for epoch in (1, 2):  # epoch 1: the subset's own pass; epoch 2 (the last): the full pass, restricted
        model = run_dir / "local_checkpoints" / f"checkpoint_epoch{epoch:04d}" / "model.pt"
        expected = _recovery(model, result.config, partly_known, rows, ids)
        assert result.history[epoch - 1]["noisy_recovery"] == pytest.approx(expected, abs=1e-9), epoch

    exported = pq.read_table(Path(result.checkpoint_path) / "corrected_labels.parquet").to_pandas()
    assert sorted(exported["id"]) == list(range(len(rows["id"]))), "the exports hold every noisy id"
    measured = exported[exported["id"].isin(ids)]
    right = (measured["corrected_label"].to_numpy() == np.array([truth[i] for i in measured["id"]])).mean()
    assert result.metrics["corrected_accuracy"] == pytest.approx(right, abs=1e-9)

    again = run(cfg.with_overrides(["tracking.run_name=known-again"]), progress=False)
    assert np.array_equal(np.load(Path(again.run_dir) / EVAL_IDS_FILE), ids), "the same subset on every run"
