"""Sweeps: search spaces, a real Ray Tune sweep of Ray Train trials with ASHA, nested MLflow runs, resume."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from metacorrect.config import ConfigError, ExperimentConfig
from procs import kill_cli_after_line, set_args

# A learning rate that trains (epoch-1 val 0.24-0.45 over seeds 0 and 1) and one that cannot (at most 0.1).
ASHA_SPACE = {"optim.lr": {"grid": [0.05, 1e-6]}, "train.seed": {"choice": [0, 1]}}
ASHA_EPOCHS = 3  # room for the stop to land before the stopped trial's last epoch


def _config(data_path, workdir, tracking_uri, experiment, epochs=2, workers=1):
    # Tiny on purpose: the cost of a trial on 2 cores is Ray Train's start (~15 s), not the epochs.
    # workers=0: each trial runs its loop itself, without Ray Train.
    return ExperimentConfig.from_dict({
        "data": {"path": str(data_path)}, "train": {"epochs": epochs, "eval_noisy": "off"},
        "model": {"arch": "small_cnn", "width": 8}, "resources": {"num_workers": workers, "max_failures": 0},
        "tracking": {"uri": tracking_uri, "storage_path": str(workdir / "sweeps"), "experiment": experiment}})


def _children(uri, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return client, client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# ---- spaces (no Ray) ------------------------------------------------------------------------------------
def test_every_method_declares_a_valid_default_space():
    from metacorrect.methods import METHODS
    from metacorrect.tuning.space import load_space, to_tune

    for name in METHODS:
        cfg = ExperimentConfig().for_method(name)
        space = load_space(None, cfg)
        assert space and set(to_tune(space)) == set(space), name
    mlc = load_space(None, ExperimentConfig().for_method("mlc"))
    assert mlc["method.k"] == {"choice": [1, 2, 5, 10]} and "loguniform" in mlc["method.meta_lr"]
    assert "method.hidden_dim" in load_space(None, ExperimentConfig().for_method("emlc"))


def test_space_yaml_forms_are_normalised(tmp_path):
    from metacorrect.tuning.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {loguniform: [1e-3, 1e-1]}\nmethod.k: [1, 5]\nmodel.width: {randint: [8, 16]}\n"
                    "train.seed: {grid: [0, 1]}\n")
    space = load_space(path, ExperimentConfig().for_method("mlc"))
    assert space == {"optim.lr": {"loguniform": [1e-3, 1e-1]}, "method.k": {"choice": [1, 5]},
                     "model.width": {"randint": [8, 16]}, "train.seed": {"grid": [0, 1]}}


def test_invalid_space_fails_before_any_trial_with_one_line_per_problem(tmp_path, capsys):
    from metacorrect import cli
    from metacorrect.tuning import sweep

    storage = tmp_path / "sweeps"
    cfg = ExperimentConfig().for_method("mlc").with_values({"tracking.storage_path": str(storage),
                                                            "tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    bad = {"optim.lrr": {"loguniform": [0.01, 0.1]}, "method.k": {"choice": []},
           "optim.momentum": {"uniform": [0.9, 0.5]}, "method.meta_lr": {"loguniform": [0.0, 0.1]},
           "model.width": [0, 8]}
    with pytest.raises(ConfigError) as e:
        sweep(cfg, bad, num_samples=2)
    problems = e.value.problems
    assert any("optim.lrr: unknown config field" in p and "optim.lr" in p for p in problems)
    assert any("method.k: choice has no values" in p for p in problems)
    assert any("optim.momentum: empty range [0.9, 0.5]" in p for p in problems)
    assert any("method.meta_lr: loguniform needs low > 0" in p for p in problems)
    assert not storage.exists(), "nothing was started or written"
    assert not (tmp_path / "m.db").exists()

    with pytest.raises(ConfigError, match="model.width=0: model.width: must be >= 1"):
        sweep(cfg, {"model.width": [0, 8]}, num_samples=2)
    with pytest.raises(ConfigError, match="scheduler: 'pbt'"):
        sweep(cfg, None, scheduler="pbt")
    with pytest.raises(ConfigError, match="metric: expected a validation metric"):
        sweep(cfg, None, metric="test_accuracy")

    config_file = tmp_path / "c.yaml"
    cfg.to_yaml(config_file)
    space_file = tmp_path / "s.yaml"
    space_file.write_text(yaml.safe_dump({"optim.lr": {"uniform": [0.2, 0.1]}, "nope.x": [1]}))
    assert cli.main(["sweep", str(config_file), "--space", str(space_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"error: {space_file}: ") for line in err)
    assert not storage.exists()


def test_an_interrupted_sweep_closes_its_open_children_and_only_those(tmp_path):
    """The sweep driver owns its children's status: on interrupt it closes the children still RUNNING (KILLED)
    and leaves a finished one as it was."""
    from metacorrect.platform import tracking

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = tracking.start_run(uri, "close-children", "parent", tmp_path / "parent")
    children = [tracking.start_run(uri, "close-children", f"trial-{i}", tmp_path / f"t{i}",
                                   tags={"mlflow.parentRunId": parent})[0] for i in range(3)]
    other, _ = tracking.start_run(uri, "close-children", "unrelated", tmp_path / "other")
    tracking.end_run(uri, children[0], "FINISHED")
    assert tracking.end_open_children(uri, parent, "KILLED") == 2
    c = tracking.client(uri)
    assert [c.get_run(r).info.status for r in children] == ["FINISHED", "KILLED", "KILLED"]
    assert c.get_run(other).info.status == "RUNNING" and c.get_run(parent).info.status == "RUNNING"
    assert tracking.end_open_children(uri, parent, "KILLED") == 0


# ---- real sweeps ------------------------------------------------------------------------------------------
def test_trial_id_comes_from_tune_not_from_a_suffixed_directory(tmp_path):
    """A trial re-created on resume gets `trial-ID_1a2b` as its directory when the killed driver had already
    made `trial-ID`; the table and the MLflow child run must still agree on `ID`."""
    from ray.tune import Result

    from metacorrect.tuning.sweep import _trial_id

    suffixed = str(tmp_path / "trial-7b4f8_00002_a462")
    assert _trial_id(Result(metrics={"trial_id": "7b4f8_00002", "epoch": 1}, checkpoint=None, error=None,
                            path=suffixed)) == "7b4f8_00002"
    # a trial that died before its first report has no metrics: the suffix is recognised in the name
    assert _trial_id(Result(metrics={}, checkpoint=None, error=None, path=suffixed)) == "7b4f8_00002"
    assert _trial_id(Result(metrics={}, checkpoint=None, error=None,
                            path=str(tmp_path / "trial-7b4f8_00001"))) == "7b4f8_00001"


@pytest.mark.parametrize("resources, requested, expected", [
    # a trial per Ray Train worker: data_cpus left to Ray Data, the driver's 0.05 per trial
    ({"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 0.5}, None, (2, 0.5)),
    ({"num_workers": 1, "data_cpus": 1.0}, 2, (2, 0.25)),
    # trials that train in their own process keep a whole CPU free for Ray Data's read tasks, and no more of them
    # run at once than fit beside it, whatever is asked
    ({"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.5}, None, (2, 0.5)),
    ({"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.5}, 4, (2, 0.5)),
    ({"num_workers": 0, "data_cpus": 0.0}, 2, (2, 0.5)),
    ({"num_workers": 0}, None, (1, 1.0)),
])
def test_trials_are_planned_to_fit_the_cluster_and_leave_ray_data_a_cpu(resources, requested, expected):
    from metacorrect.tuning.sweep import SweepOptions, plan_trials

    cfg = ExperimentConfig.from_dict({"resources": resources})
    concurrency, planned = plan_trials(cfg, SweepOptions(max_concurrent_trials=requested), 8, cluster={"CPU": 2.0})
    assert (concurrency, planned.resources.cpus_per_worker) == expected


@pytest.mark.slow
def test_an_asha_sweep_on_ray_train_is_refused_on_a_cluster_without_the_dashboard(digits_noisy, tmp_path):
    """A real cluster started without the dashboard (in a process of its own: this one may hold the session's):
    ASHA's stopped trials could never give their Ray Train workers back there, so `metacorrect sweep` refuses
    with one line and exit status 2 before any run or trial starts. (On a cluster with the dashboard the ASHA sweep
    below runs.)"""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.path={digits_noisy}", f"tracking.uri={uri}", f"tracking.storage_path={tmp_path / 'sweeps'}"]
    args = ["sweep", "configs/digits_mlc.yaml", "--num-samples", "2", *set_args(["resources.num_workers=1", *sets])]
    script = f"""
import sys
import ray
from metacorrect import cli
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
args = {args!r}
print("exit status", cli.main(args), file=sys.stderr, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("error:", "exit status"))]
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith("error: scheduler: 'asha' stops trials early, and this Ray cluster answers no state "
                               "API") and "--scheduler fifo" in lines[0], lines
    assert lines[1] == "exit status 2", lines
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists(), "nothing was started"


@pytest.mark.slow
def test_an_asha_sweep_stops_the_worse_trial_and_tracks_nested_runs_and_the_best_config(
        ray_cluster, digits_noisy, workdir, tracking_uri, tmp_path):
    """Two Ray Train trials, one after the other: a learning rate that trains, then one that cannot (1e-6), which
    ASHA stops at its first rung (epoch 1) against the first trial's. The stopped trial's child run is still
    closed complete, from its last checkpoint. (Two trials on Ray Train workers: on 2 cores a trial's cost is
    Ray Train's start; test_bench.py's suites run trials in their own process.)"""
    import metacorrect
    from metacorrect.platform.trainer import run

    cfg = _config(digits_noisy, workdir, tracking_uri, "sweep-tests", epochs=ASHA_EPOCHS)
    ctrl_c = signal.getsignal(signal.SIGINT)
    result = metacorrect.sweep(cfg, ASHA_SPACE, num_samples=1, scheduler="asha", max_concurrent_trials=1,
                               name="asha2")
    assert signal.getsignal(signal.SIGINT) is ctrl_c, "Ray Tune's Ctrl-C handler is not left behind"

    table = result.trials
    assert len(table) == 2 and table["trial_id"].is_unique
    assert set(table["train.seed"]) <= {0, 1}
    assert table["best_val_accuracy"].notna().all()
    assert list(table["best_val_accuracy"]) == sorted(table["best_val_accuracy"], reverse=True)  # best first
    trains, cannot = (table.loc[table["optim.lr"] == lr].iloc[0] for lr in ASHA_SPACE["optim.lr"]["grid"])
    # ASHA (grace 1, reduction 2) compares each trial at epoch 1 with those that reached it before
    assert trains["status"] == "finished" and trains["epochs"] == ASHA_EPOCHS, table.to_string()
    # the stop reaches a trial while it trains on: it may have finished the next epoch by then
    assert cannot["status"] == "stopped early" and 1 <= cannot["epochs"] < ASHA_EPOCHS, table.to_string()

    client, children = _children(result.tracking_uri, result.parent_run_id)
    assert len(children) == 2, "one nested child run per trial"
    assert {c.data.tags["trial_id"] for c in children} == set(table["trial_id"])
    for child in children:
        assert child.info.status == "FINISHED"
        row = table.loc[table["trial_id"] == child.data.tags["trial_id"]].iloc[0]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, int(row["epochs"]) + 1))
        assert {"config.yaml", "model", "plots"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
        assert float(child.data.params["optim.lr"]) == pytest.approx(float(row["optim.lr"]))
        # named by its searched values and the trial's number
        number = int(row["trial_id"].rsplit("_", 1)[1])
        assert child.info.run_name == f"lr={float(row['optim.lr']):.3g} seed={int(row['train.seed'])} #{number}"
        assert child.data.tags["seed"] == str(int(row["train.seed"])) and child.data.tags["method"] == "erm"
        assert "epoch" not in child.data.metrics and child.data.tags["epoch"] == str(int(row["epochs"]))

    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(table["best_val_accuracy"].max(), rel=1e-5)
    # every field of the base config (the overrides included), less the searched ones
    assert parent.data.params["model.width"] == "8" and parent.data.params["train.eval_noisy"] == "off"
    assert "optim.lr" not in parent.data.params and "train.seed" not in parent.data.params
    assert parent.data.tags["sweep.trials"] == "2" and "wall_s" in parent.data.tags
    assert parent.data.tags["mlflow.note.content"].startswith("sweep of optim.lr, train.seed")
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "space.yaml", "best_config.yaml", "config.yaml"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/val_accuracy_vs_optim.lr.png",
                     "plots/val_accuracy_vs_train.seed.png"}
    for plot in plots:
        assert Path(client.download_artifacts(result.parent_run_id, plot, str(tmp_path))).stat().st_size > 5000
    trials_csv = Path(client.download_artifacts(result.parent_run_id, "trials.csv", str(tmp_path)))
    assert len(trials_csv.read_text().strip().splitlines()) == 3

    best_row = table.iloc[0]
    best_file = result.save_best(tmp_path / "best.yaml")
    best = ExperimentConfig.from_yaml(best_file)
    assert best.optim.lr == pytest.approx(best_row["optim.lr"]) and best.train.seed == best_row["train.seed"]
    assert best.tracking.run_name is None and best.resources.cpus_per_worker is None  # the user's resources
    again = run(best, ["train.epochs=1", "resources.num_workers=0"], progress=False)
    assert again.metrics["epoch"] == 1 and 0.0 <= again.metrics["val_accuracy"] <= 1.0

    with pytest.raises(ConfigError, match="already exists.*--resume"):
        metacorrect.sweep(cfg, ASHA_SPACE, num_samples=1, name="asha2")


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(
        ray_cluster, digits_noisy, workdir, tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    import metacorrect

    cfg = _config(digits_noisy, workdir, tracking_uri, "sweep-resume", epochs=1, workers=0)
    config_file, space_file = tmp_path / "config.yaml", tmp_path / "space.yaml"
    cfg.to_yaml(config_file)
    space = {"optim.lr": {"loguniform": [0.01, 0.2]}}
    space_file.write_text(yaml.safe_dump(space))
    # the driver dies mid-sweep, as on a crash, once the first trial has finished
    finished, _, _ = kill_cli_after_line(["sweep", str(config_file), "--space", str(space_file), "--num-samples", "2",
                                    "--max-concurrent", "1", "--scheduler", "fifo", "--name", "killed"],
                                   ray_cluster.get_runtime_context().gcs_address,
                                   lambda line: line.split()[2] if line.startswith("[sweep] trial ") and " finished" in line
                                   else None)

    run_dir = workdir / "sweeps" / "killed" / "trial_runs" / f"trial-{finished}"
    client = MlflowClient(tracking_uri)
    finished_run = client.get_run(__import__("json").loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert finished_run.info.status == "FINISHED"
    checkpoints = sorted(p.name for p in (run_dir / "local_checkpoints").glob("checkpoint_*"))
    assert checkpoints, "the trial's loop ran in its Tune trial and kept its own checkpoints"
    started_before = {p.name for p in (workdir / "sweeps" / "killed" / "trial_runs").iterdir()}

    result = metacorrect.sweep(cfg, space, num_samples=2, scheduler="fifo", max_concurrent_trials=1, name="killed",
                               resume=True, progress=False)
    table = result.trials
    assert len(table) == 2 and table["trial_id"].is_unique, "total trials = requested"
    assert (table["status"] == "finished").all()
    assert finished in set(table["trial_id"]) and started_before <= {f"trial-{t}" for t in table["trial_id"]}
    again = client.get_run(finished_run.info.run_id)
    assert again.info.end_time == finished_run.info.end_time, "the finished trial was not run again"
    assert sorted(p.name for p in (run_dir / "local_checkpoints").glob("checkpoint_*")) == checkpoints
    assert len(client.get_metric_history(finished_run.info.run_id, "val_accuracy")) == 1

    _, children = _children(tracking_uri, result.parent_run_id)
    assert len(children) == 2, "exactly one MLflow child run per trial"
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(table["trial_id"])
    assert all(c.info.status == "FINISHED" for c in children)
    parents = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                 filter_string="tags.`sweep.role` = 'parent'")
    assert len(parents) == 1, "the resumed sweep reuses its parent run"
