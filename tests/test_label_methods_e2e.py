"""MSLG and instance soft labels end to end (Ray Train local mode, MLflow): on digits with 40% and 60%
symmetric noise they beat erm, their learned labels recover the true class of more corrupted samples as
training goes on (per-epoch MLflow metric), and the label table reaches MLflow with one row per noisy id."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

METHODS = ("erm", "mslg", "soft_labels")
NOISE = (0.4, 0.6)


@pytest.fixture(scope="module")
def runs(ray_cluster, workdir, tracking_uri):
    from metacorrect.config import ExperimentConfig
    from metacorrect.datasets.prepare import prepare
    from metacorrect.platform.trainer import run

    results = {}
    for rate in NOISE:
        path = workdir / "data" / f"digits-sym{int(rate * 100)}-labels"
        if not path.exists():
            prepare("digits", path, noise=f"symmetric:{rate}", clean_per_class=10, seed=0, progress=False)
        common = [f"data.path={path}", f"tracking.uri={tracking_uri}", f"tracking.storage_path={workdir / 'runs'}",
                  "tracking.experiment=tests-label-methods", "resources.num_workers=0", "data.deterministic=true",
                  "train.epochs=15"]
        for method in METHODS:
            config = "configs/digits_demo.yaml" if method == "erm" else f"configs/digits_{method}.yaml"
            results[rate, method] = run(ExperimentConfig.from_yaml(config, common), progress=False)
    return results


@pytest.mark.parametrize("rate", NOISE)
@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_learned_labels_beat_erm(runs, method, rate):
    ours, erm = runs[rate, method].metrics["test_at_best_val"], runs[rate, "erm"].metrics["test_at_best_val"]
    assert ours > erm, (method, rate, ours, erm)


@pytest.mark.parametrize("rate", NOISE)
@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_corrupted_samples_regain_their_true_class(runs, method, rate):
    from mlflow.tracking import MlflowClient

    result = runs[rate, method]
    history = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id,
                                                                   "corrected_accuracy_corrupted")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == 15
    assert values[-1] > values[0] + 0.1, values


@pytest.mark.parametrize("method", ["mslg", "soft_labels"])
def test_label_table_reaches_mlflow(runs, method):
    from mlflow.tracking import MlflowClient

    result = runs[0.6, method]
    client = MlflowClient(result.tracking_uri)
    table = pq.read_table(client.download_artifacts(result.mlflow_run_id, "labels/label_table.parquet")).to_pandas()
    assert list(table["id"]) == list(range(len(table)))
    assert len(table) == pq.read_metadata(client.download_artifacts(
        result.mlflow_run_id, "labels/corrected_labels.parquet")).num_rows
    assert (table["argmax"] >= 0).all() and table["entropy"].notna().all()
    assert result.metrics["corrected_accuracy"] > 0.4  # above the share of correct noisy labels (0.4)
