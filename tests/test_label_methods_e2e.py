"""MSLG and instance soft labels end to end (the loop in the driver, MLflow): on digits with 60% symmetric noise
soft labels beat erm and MSLG ends far above the share of true noisy labels (it beats erm on 9 seeds of 10), their
learned labels recover the true class of more corrupted samples as training goes on
(per-epoch MLflow metric), and the label table reaches MLflow with one row per noisy id. The shared 15-epoch
runs of conftest's `digits_runs` (seed 0); each bound holds on every seed that benchmarks/digits_accuracy.py
measured (docs/benchmarks.md "Accuracy on digits")."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

METHODS = ("erm", "mslg", "soft_labels")
SETTINGS = ("sym60",)  # and 40% symmetric noise in benchmarks/digits_accuracy.py (docs/benchmarks.md "Accuracy on digits")


@pytest.fixture(scope="module")
def runs(digits_runs):
    return {(s, m): digits_runs(s, m) for s in SETTINGS for m in METHODS}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_learned_labels_beat_erm(runs, method, setting):
    ours, erm = runs[setting, method].metrics["test_at_best_val"], runs[setting, "erm"].metrics["test_at_best_val"]
    if method == "soft_labels":  # 5-seed minimum margin at 60% noise: +0.047
        assert ours > erm, (method, setting, ours, erm)
    else:  # MSLG beats erm on 9 seeds of 10; on one its student collapses after the warm-up and ends at 0.813.
        # What holds on all 10 is asserted: far above the share of true noisy labels, as erm on average (0.855).
        assert ours > 0.8, (method, setting, ours, erm)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_corrupted_samples_regain_their_true_class(runs, method, setting):
    from mlflow.tracking import MlflowClient

    result = runs[setting, method]
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id,
                                                                   "corrected_accuracy_corrupted")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == 15
    assert values[-1] > values[0] + 0.05, values  # 5-seed minimum growth: mslg 0.148, soft_labels 0.58


@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_label_table_reaches_mlflow(runs, method):
    from mlflow.tracking import MlflowClient

    result = runs["sym60", method]
    client = MlflowClient(result.tracking_uri)
    table = pq.read_table(client.download_artifacts(result.mlflow_run_id, "labels/label_table.parquet")).to_pandas()
    assert list(table["id"]) == list(range(len(table)))
    assert len(table) == pq.read_metadata(client.download_artifacts(
        result.mlflow_run_id, "labels/corrected_labels.parquet")).num_rows
    assert (table["argmax"] >= 0).all() and table["entropy"].notna().all()
    assert result.metrics["corrected_accuracy"] > 0.4  # above the share of true noisy labels (0.396); 5-seed min 0.477
