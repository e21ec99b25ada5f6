"""What every run records about its inputs and its machine in MLflow: the data set as a dataset input whose
digest is that of its noisy labels (two runs on the same noise realisation show the same digest, another
realisation another), and system metrics of the node that trained."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_runs_log_their_data_set_by_label_digest_and_system_metrics(ray_cluster, digits_noisy, digits_clean,
                                                                    experiment):
    from mlflow.tracking import MlflowClient

    from metacorrect.datasets.contract import read_meta
    from metacorrect.datasets.labels import label_digest
    from metacorrect.platform.trainer import run

    def trained(data):
        result = run(experiment(data, resources__num_workers=0, train__epochs=2,
                                tracking__system_metrics_interval_s=0.2), progress=False)
        mlrun = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
        (dataset,) = [d.dataset for d in mlrun.inputs.dataset_inputs]
        return mlrun, dataset

    first, dataset = trained(digits_noisy)
    assert dataset.name == read_meta(digits_noisy).name and dataset.digest == label_digest(digits_noisy)
    # MLflow keeps one dataset record per (name, digest) in an experiment: its source is the path of the first
    # run that logged those labels (another copy of the same data set shares it).
    assert dataset.source_type == "local"
    assert any(k.startswith("system/cpu_utilization_percentage") for k in first.data.metrics), \
        sorted(first.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in first.data.metrics)
    _, same = trained(digits_noisy)
    _, other = trained(digits_clean)
    assert same.digest == dataset.digest, "the same noisy labels, the same digest"
    assert other.digest != dataset.digest, "another noise realisation, another digest"


def test_runs_that_start_together_each_log_the_same_data_set(tmp_path):
    """Trials of a sweep start together and log the same data set: MLflow inserts its dataset record only when
    the (experiment, name, digest) is new, so two runs at once race to insert it and one of them hits the
    UNIQUE constraint. Each run must still get its input (the loser finds the winner's record on a retry)."""
    import threading

    from metacorrect.platform import tracking

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [tracking.start_run(uri, "together", f"run{i}", tmp_path / f"r{i}")[0] for i in range(8)]
    barrier, errors = threading.Barrier(len(runs)), []

    def log(run_id: str) -> None:
        barrier.wait()
        try:
            tracking.log_dataset(uri, run_id, "digits-sym60", str(tmp_path), "0123456789abcdef")
        except Exception as e:  # noqa: BLE001 - the assertion below names it
            errors.append(repr(e))

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    client = tracking.client(uri)
    for run_id in runs:
        (dataset,) = [d.dataset for d in client.get_run(run_id).inputs.dataset_inputs]
        assert dataset.digest == "0123456789abcdef"
