"""How runs read in MLflow: experiments of the model-training kind, short run names, the tags a researcher filters
by, a one-line description, bookkeeping values as tags rather than charts, and `tracking.register_model`
registering the final student with the run's metrics. Real SQLite stores, a real run in the driver."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from metacorrect.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits_demo.yaml"


def test_new_and_existing_experiments_open_on_the_training_view(tmp_path):
    """The MLflow 3 UI picks an experiment's view from `mlflow.experimentKind`; a kind the user set is kept."""
    from metacorrect.platform import tracking

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client(uri)
    new = c.get_experiment(tracking.experiment_id(uri, "fresh"))
    assert new.tags["mlflow.experimentKind"] == "custom_model_development"
    assert new.tags["mlflow.note.content"].startswith("Runs of metacorrect")
    # the runs table with the researcher's columns, opened by the UI's share-view link
    view = json.loads(new.tags["mlflow.sharedViewState.metacorrect"])
    assert {"tags.`method`", "tags.`noise_rate`", "tags.`seed`", "metrics.`test_accuracy`"} <= set(
        view["selectedColumns"])
    assert tracking.view_path(new.experiment_id) == (
        f"/#/experiments/{new.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=metacorrect")
    old = c.create_experiment("made-before")  # e.g. by an older metacorrect: no kind
    assert tracking.experiment_id(uri, "made-before") == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = c.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.experiment_id(uri, "chosen")
    assert c.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_bookkeeping_values_become_tags_and_the_rest_rounded_metrics(tmp_path):
    from metacorrect.platform import tracking
    from metacorrect.platform.records import log_missing_epochs

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, _ = tracking.start_run(uri, "rows", "r", tmp_path / "r")
    history = [{"epoch": e, "lr": 0.1 / e, "val_accuracy": 0.7549234135667396 + e / 100, "best_epoch": e,
                "ema_best_epoch": 1, "epoch_time_s": 12.345678, "steps": 18, "noisy_rows_seen": 1138}
               for e in (1, 2)]
    assert log_missing_epochs(uri, run_id, history) == 2
    assert log_missing_epochs(uri, run_id, history) == 0, "the epochs MLflow holds are not logged again"
    run = tracking.client(uri).get_run(run_id)
    assert set(run.data.metrics) == {"lr", "val_accuracy"}
    assert run.data.metrics["val_accuracy"] == 0.774923  # 6 significant digits
    assert [m.step for m in tracking.client(uri).get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert {k: run.data.tags[k] for k in ("epoch", "best_epoch", "ema_best_epoch", "epoch_time_s", "steps",
                                           "noisy_rows_seen")} == {
        "epoch": "2", "best_epoch": "2", "ema_best_epoch": "1", "epoch_time_s": "12.35", "steps": "18",
        "noisy_rows_seen": "1138"}


def test_sweep_children_are_named_by_their_searched_values():
    from metacorrect.platform.run_layout import trial_name

    assert trial_name({"optim.lr": 0.067412, "train.seed": 1}, "b5272_00002") == "lr=0.0674 seed=1 #2"
    assert trial_name({"optim.lr": 0.1, "method.lr": 0.01}, "b5272_00000") == "optim.lr=0.1 method.lr=0.01 #0"


def test_cli_refuses_a_bad_registry_name_before_anything_starts(capsys):
    rc = main(["run", str(DEMO), "--set", "tracking.register_model=digits:v1", "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert lines == ["error: tracking.register_model: expected a model registry name (text without '/' or ':') "
                     "or null (nothing registered), got 'digits:v1'"]


@pytest.mark.slow
def test_a_run_is_named_tagged_described_and_registers_its_final_student(ray_cluster, digits_noisy, experiment):
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from metacorrect.datasets.contract import read_meta
    from metacorrect.methods.backbones import build_backbone
    from metacorrect.platform.trainer import run

    result = run(experiment(digits_noisy, resources__num_workers=0, train__epochs=2, train__seed=3,
                            tracking__register_model="digits-student", tracking__system_metrics="false"),
                 progress=False)
    c = MlflowClient(result.tracking_uri)
    mlrun = c.get_run(result.mlflow_run_id)
    meta = read_meta(digits_noisy)

    assert re.fullmatch(r"erm-digits-sym60-s3-[0-9a-f]{4}", mlrun.info.run_name), mlrun.info.run_name
    assert result.run_name == mlrun.info.run_name  # also the run directory: a run of that name resumes it
    tags = mlrun.data.tags
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert {k: tags[k] for k in ("method", "dataset", "source", "noise", "noise_type", "noise_rate", "clean_size",
                                 "clean_per_class", "seed", "git_commit", "mlflow.source.git.commit")} == {
        "method": "erm", "dataset": meta.name, "source": "digits", "noise": "symmetric:0.6",
        "noise_type": "symmetric", "noise_rate": "0.6", "clean_size": "100", "clean_per_class": "10", "seed": "3",
        "git_commit": commit.strip(), "mlflow.source.git.commit": commit.strip()}
    assert tags["git_dirty"] in ("true", "false")
    description = tags["mlflow.note.content"]
    assert description.startswith(f"erm on {meta.name}: symmetric:0.6 noise (actual 0.") and "\n" not in description
    assert "100 clean" in description and "seed 3" in description and "2 epochs" in description
    assert description.endswith("; in the driver")

    # charts: what a researcher reads; bookkeeping: tags
    assert {"val_accuracy", "test_accuracy", "train_loss", "best_val_accuracy", "lr"} <= set(mlrun.data.metrics)
    assert not {"epoch", "best_epoch", "epoch_time_s", "steps", "noisy_rows_seen", "wall_s"} & set(mlrun.data.metrics)
    assert tags["epoch"] == "2" and tags["best_epoch"] in ("1", "2") and float(tags["epoch_time_s"]) > 0
    assert float(tags["wall_s"]) > 0

    # the printed result links the runs table in the training workflow with the researcher's columns
    assert (f"runs table: http://127.0.0.1:5000/#/experiments/{mlrun.info.experiment_id}/runs?"
            "workflowType=machine_learning&viewStateShareKey=metacorrect") in str(result)

    # the registry: a version of the final student, from this run, with the run's last-epoch metrics
    assert tags["registered_model"] == "digits-student/1"
    version = c.get_model_version("digits-student", "1")
    assert version.run_id == result.mlflow_run_id
    assert version.source.startswith("models:/m-"), version.source  # the run's logged model
    logged = c.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == result.mlflow_run_id and logged.experiment_id == mlrun.info.experiment_id
    assert "READY" in str(logged.status)
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["val_accuracy"] == mlrun.data.metrics["val_accuracy"]
    assert linked["test_accuracy"] == mlrun.data.metrics["test_accuracy"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(result.tracking_uri)
    try:
        model = mlflow.pytorch.load_model("models:/digits-student/1")
    finally:
        mlflow.set_tracking_uri(previous)
    final = build_backbone("small_cnn", meta.num_classes, meta.image_shape, 16)
    final.load_state_dict(torch.load(Path(result.checkpoint_path) / "model.pt", map_location="cpu",
                                     weights_only=True))
    h, w, ch = meta.image_shape
    x = torch.randn(5, ch, h, w)
    with torch.no_grad():
        assert torch.allclose(model(x), final.eval()(x), atol=1e-5), "the final student, any batch size"
