"""IEG, MW-Net and L2RW end to end (trainer, Ray Data, MLflow): digits with 60% symmetric and 40% pair
noise (seed 0), 10 clean images per class, the shared runs of conftest's `digits_runs` (the loop in the driver,
a fixed block order); the margins hold on each of 5 seeds (benchmarks/digits_accuracy.py)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from background_runs import ACCURACY_EPOCHS as EPOCHS, WEIGHT_EPOCHS  # the shared runs of conftest's `digits_runs`

pytestmark = pytest.mark.slow

NOISY_ROWS = 1138  # digits with 10 clean and 20 val images per class and a 20% test split


@pytest.fixture(scope="module")
def runs(digits_runs):
    """erm and ieg on both noise models; mwnet and l2rw on the symmetric one (same data, seed, schedule)."""
    out = {(n, m): digits_runs(n, m) for n in ("sym60", "pair40") for m in ("erm", "ieg")}
    return out | {("sym60", m): digits_runs("sym60", m, WEIGHT_EPOCHS) for m in ("mwnet", "l2rw")}


@pytest.mark.parametrize("noise", ["sym60", "pair40"])
def test_ieg_beats_erm(runs, noise):
    score = {m: r.metrics["test_at_best_val"] for (n, m), r in runs.items() if n == noise}
    assert score["ieg"] > score["erm"] + 0.03, score  # 5-seed minimum margins: +0.086 / +0.097


def test_ieg_logs_the_ema_model_and_trains_on_worker_made_views(runs):
    from mlflow.tracking import MlflowClient

    for noise in ("sym60", "pair40"):
        result = runs[noise, "ieg"]
        client = MlflowClient(result.tracking_uri)
        for key in ("ema_val_accuracy", "ema_test_accuracy", "meta_loss", "consistency", "given_label_fraction"):
            assert len(client.get_metric_history(result.mlflow_run_id, key)) == EPOCHS, key
        assert 0.5 < result.metrics["ema_test_accuracy"] <= 1.0
        assert "ema_test_at_best_val" in result.metrics
        # Views are made only by the train loop's to_batch, on the worker; without them the consistency
        # term compares the original with itself and is exactly 0.
        assert all(m.value > 0 for m in client.get_metric_history(result.mlflow_run_id, "consistency"))


@pytest.mark.parametrize("method", ["mwnet", "l2rw", "ieg"])
def test_reweighting_methods_log_weight_histograms(runs, method):
    from mlflow.tracking import MlflowClient

    result = runs["sym60", method]
    client = MlflowClient(result.tracking_uri)
    epochs = EPOCHS if method == "ieg" else WEIGHT_EPOCHS
    for key in ("weight_mean_clean", "weight_mean_corrupted", "meta_loss"):
        assert len(client.get_metric_history(result.mlflow_run_id, key)) == epochs, key
    assert result.metrics["test_at_best_val"] > 0.3  # 2 epochs on 60% noise: learning, not converged
    png = client.download_artifacts(result.mlflow_run_id, "plots/sample_weights.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(client.download_artifacts(result.mlflow_run_id,
                                                    "weights/sample_weights.parquet")).to_pandas()
    assert sorted(table["id"]) == list(range(NOISY_ROWS)), "one row per noisy id"
    assert abs(table["corrupted"].mean() - 0.604) < 0.01  # digits-sym60, seed 0: 60.4% of the labels are wrong
    assert (table["weight"] >= 0).all()
    clean_mean = table.loc[~table["corrupted"], "weight"].mean()
    corrupted_mean = table.loc[table["corrupted"], "weight"].mean()
    assert clean_mean == pytest.approx(result.metrics["weight_mean_clean"], rel=1e-5)
    assert corrupted_mean == pytest.approx(result.metrics["weight_mean_corrupted"], rel=1e-5)


def test_erm_logs_no_sample_weights(runs):
    from mlflow.tracking import MlflowClient

    result = runs["sym60", "erm"]
    assert "weight_mean_clean" not in result.metrics
    assert not [a for a in MlflowClient(result.tracking_uri).list_artifacts(result.mlflow_run_id) if a.path == "weights"]
