"""Benchmark suites: suite files and their validation, method files, a real suite on Ray Tune with nested MLflow
runs and its leaderboard, resume after the driver is killed, the per-sample export."""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from metacorrect.config import ConfigError, ExperimentConfig
from procs import kill_cli_after_line

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


def _suite(tmp_path, workdir, tracking_uri, experiment, methods, settings, seeds, epochs=1):
    """A tiny suite on digits, each trial's loop in its Tune trial (`num_workers: 0`): on 2 cores a trial on a
    Ray Train worker costs mostly Ray Train's start (test_sweep.py's ASHA sweep runs its trials on workers)."""
    return {"name": experiment, "base": {
        "data": {"prepare": {"source": "digits", "clean_per_class": 10, "val_per_class": 20}},
        "model": {"arch": "small_cnn", "width": 8},
        "train": {"epochs": epochs, "batch_size": 64, "clean_batch_size": 32, "log_every": 0},
        "resources": {"num_workers": 0, "max_failures": 0},
        "tracking": {"uri": tracking_uri, "storage_path": str(workdir / "benches"), "experiment": experiment,
                     "system_metrics": False, "log_model": False}},
        "data_root": str(workdir / "bench-data"), "settings": settings, "methods": methods, "seeds": seeds}


def _children(uri, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_id).info.experiment_id
    return client, client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# ---- method files and suite files (no Ray) --------------------------------------------------------------------
def test_method_files_compose_with_the_base_into_the_digits_configs():
    """configs/methods/*.yaml hold each method's digits defaults once: configs/digits_<method>.yaml take their method
    section from them (`method: FILE`, no copy to drift), and composed with configs/base/digits.yaml (`run
    --method`) they give the same method, data, model and optimizer as the method's demo config."""
    assert {p.stem for p in METHOD_FILES} == {"erm", "clean_only", "mlc", "emlc", "mslg", "soft_labels", "ieg",
                                              "mwnet", "l2rw"}
    for path in METHOD_FILES:
        composed = ExperimentConfig.from_yaml(ROOT / "configs/base/digits.yaml", method=path)
        old = ROOT / "configs" / f"digits_{path.stem}.yaml"
        if old.is_file():
            assert yaml.safe_load(old.read_text())["method"] == f"methods/{path.stem}.yaml", old
            full = ExperimentConfig.from_yaml(old)
            assert composed.method == full.method, path.stem
            for section in ("model", "optim"):
                assert getattr(composed, section) == getattr(full, section), (path.stem, section)
            assert composed.data.prepare == full.data.prepare


def test_base_key_composes_a_config_over_another(tmp_path):
    (tmp_path / "m.yaml").write_text("base: ../configs/base/digits.yaml\nmethod: {name: mlc, k: 2}\n"
                                     "train: {epochs: 3}\n".replace("..", str(ROOT)))
    cfg = ExperimentConfig.from_yaml(tmp_path / "m.yaml", ["optim.lr=0.1"])
    assert (cfg.method.name, cfg.method.k, cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == ("mlc", 2, 3, 64, 0.1)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        ExperimentConfig.from_yaml(tmp_path / "loop.yaml")
    (tmp_path / "with-file.yaml").write_text(f"base: {ROOT}/configs/base/digits.yaml\nmethod: {ROOT}/configs/methods/"
                                             "mlc.yaml\ntrain: {epochs: 3}\n")
    cfg = ExperimentConfig.from_yaml(tmp_path / "with-file.yaml", ["method.k=2"])
    assert (cfg.method.name, cfg.method.k, cfg.method.meta_lr, cfg.train.epochs) == ("mlc", 2, 0.001, 3)
    (tmp_path / "no-file.yaml").write_text("method: methods/nope.yaml\n")
    with pytest.raises(ConfigError, match=r"methods/nope.yaml: method file not found"):
        ExperimentConfig.from_yaml(tmp_path / "no-file.yaml")
    (tmp_path / "bad.yaml").write_text("method: {name: mlc}\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="a method file holds one section"):
        ExperimentConfig.from_yaml(ROOT / "configs/base/digits.yaml", method=tmp_path / "bad.yaml")


def test_ready_suites_load_and_plan_every_trial():
    from metacorrect.methods import METHODS
    from metacorrect.tuning.bench import load_suite

    quick = load_suite(ROOT / "configs/suites/digits-quick.yaml")
    assert {m.method["name"] for m in quick.methods} == set(METHODS) and quick.seeds == [0]
    trials = quick.trials()
    assert len(trials) == len(METHODS)
    assert len({t.config.train.epochs for t in trials}) == 1, "one budget for every method"
    assert len({t.config.data.path for t in trials}) == 1, "one data set for every method"
    full = load_suite(ROOT / "configs/suites/digits.yaml")
    assert len(full.seeds) == 3 and len(full.trials()) == len(METHODS) * len(full.settings) * 3
    for t in full.trials():
        assert t.config.train.seed == t.seed == t.config.data.prepare.seed
    for name in ("cifar10-emlc", "cifar10-mlc", "cifar10n-worst", "clothing1m"):  # data files not needed to load
        suite = load_suite(ROOT / f"configs/suites/{name}.yaml")
        assert len(suite.trials()) == len(suite.methods) * len(suite.settings) * len(suite.seeds)
    emlc = load_suite(ROOT / "configs/suites/cifar10-emlc.yaml")
    assert emlc.settings[0].prepare == {"noise": "symmetric:0.2:uniform", "clean_per_class": 100,
                                        "val_per_class": 100}


@pytest.mark.parametrize("change, expected", [
    ({"methods": ["erm", {"name": "nope"}]}, "methods[1].name: unknown method 'nope'"),
    ({"methods": ["erm", {"file": "mlc.yaml", "kk": 3}]}, "methods[1].kk: unknown key"),
    ({"methods": [{"name": "mlc", "meta_lrr": 0.1}]}, "methods[0].meta_lrr: unknown key"),
    ({"seeds": []}, "seeds: expected a non-empty list of integers"),
    ({"settings": [{"noise": "symmetric:1.5"}]}, "settings[0]: data.prepare.noise: "),
    ({"settings": [{"noise": "symmetric:0.6", "clean": 3}]}, "settings[0].clean: unknown key"),
    ({"methods": [{"name": "erm", "overrides": {"train.epochs": 0}}]}, "methods[0] (erm): train.epochs: must be >= 1"),
    ({"methods": [{"name": "erm", "overrides": {"method.k": 2}}]}, "methods[0].overrides.method.k: not overridable"),
    ({"methods": [{"name": "erm", "overrides": {"resources.num_workers": 0}}]},
     "methods[0].overrides.resources.num_workers: not overridable per method"),
    ({"methods": ["erm", "erm"]}, "two entries are labelled 'erm'"),
    ({"budget": 3}, "budget: unknown key"),
])
def test_a_bad_suite_fails_with_one_line_naming_the_field_before_ray_starts(tmp_path, capsys, change, expected):
    import ray

    from metacorrect import cli

    (tmp_path / "mlc.yaml").write_text("method: {name: mlc, k: 1}\n")
    raw = _suite(tmp_path, tmp_path, f"sqlite:///{tmp_path}/m.db", "bad", ["erm", "mlc.yaml"],
                 [{"noise": "symmetric:0.6"}], [0]) | change
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["bench", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and expected in err[0], err
    assert not ray.is_initialized()
    assert not (tmp_path / "benches").exists() and not (tmp_path / "bench-data").exists()
    assert not (tmp_path / "m.db").exists()


# ---- a real suite on Ray Tune -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_suite_interrupted_then_resumed_tracks_one_parent_each_trial_once_and_a_true_leaderboard(
        ray_cluster, workdir, tracking_uri, tmp_path, capsys):
    """2 methods x 2 seeds, started from the CLI and stopped by Ctrl-C once a trial has finished, then resumed: the
    interrupted suite closes its runs; the resumed one trains only what was left, keeps one parent and one child
    run per trial, and its leaderboard, plots and exports are those of the child runs. (One suite for both claims:
    on 2 cores a trial's cost is Ray Train's start, not its epoch; the suite files' full factorial plan is checked
    without Ray above.)"""
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    import metacorrect
    from metacorrect import cli
    from metacorrect.datasets.labels import label_digest

    raw = _suite(tmp_path, workdir, tracking_uri, "bench-killed", ["erm", {"name": "mslg", "warmup_epochs": 0}],
                 [{"noise": "symmetric:0.6", "label": "sym60"}], [0, 1])
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw))
    finished, code, rest = kill_cli_after_line(
        ["bench", str(path), "--max-concurrent", "2"], ray_cluster.get_runtime_context().gcs_address,
        lambda line: line.split()[1] if line.startswith("[bench] ") and " finished: " in line else None,
        sig=signal.SIGINT)
    stopped = re.search(r"INTERRUPTED: (\d) of 4 trials finished; --resume continues the suite", rest)
    assert code == 130 and stopped and 1 <= int(stopped[1]) < 4, rest[-3000:]

    bench_dir = workdir / "benches" / "bench-killed"
    run_dir = bench_dir / "trial_runs" / finished
    client = MlflowClient(tracking_uri)
    parent_id = json.loads((bench_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(parent_id).info.status == "KILLED", "an interrupted suite's parent is closed KILLED"
    _, children = _children(tracking_uri, parent_id)
    assert "RUNNING" not in {c.info.status for c in children}, "no child run is left RUNNING"
    finished_run = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert finished_run.info.status == "FINISHED"
    checkpoints = sorted(p.name for p in (run_dir / "local_checkpoints").glob("checkpoint_*"))
    assert checkpoints, "the trial's loop ran in its Tune trial and kept its own checkpoints"

    capsys.readouterr()
    started = time.time()
    ctrl_c = signal.getsignal(signal.SIGINT)
    result = metacorrect.bench(path, resume=True)
    assert signal.getsignal(signal.SIGINT) is ctrl_c, "Ray Tune's Ctrl-C handler is not left behind"
    assert not result.failed
    # the progress line counts time from the resume, not from the suite's first start
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[bench] ") and "4/4 done" in x)
    elapsed = re.search(r"4/4 done, (?:(\d+) min )?(\d+) s elapsed\]", line)
    assert elapsed, line
    assert int(elapsed[1] or 0) * 60 + int(elapsed[2]) <= time.time() - started + 1, line
    # its summary counts what this call ran, and the suite's time over both calls (the parent's wall_s)
    assert result.ran == 4 - int(stopped[1]) and result.total_wall_s > result.wall_s
    assert f"4 trials, {result.ran} of them in this run's" in str(result) and "over all its runs" in str(result)
    assert client.get_run(result.parent_run_id).data.metrics["wall_s"] == pytest.approx(result.total_wall_s)
    again = client.get_run(finished_run.info.run_id)
    assert again.info.end_time == finished_run.info.end_time, "the finished trial was not run again"
    assert sorted(p.name for p in (run_dir / "local_checkpoints").glob("checkpoint_*")) == checkpoints
    # the resume (no --max-concurrent) kept the first start's plan: Tune restores 2 trials at a time, and 2 trials
    # of a whole CPU each would leave Ray Data none on 2 cores
    assert json.loads((bench_dir / "trial_plan.json").read_text()) == {"concurrency": 2, "cpus_per_worker": 0.5}
    parents = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                 filter_string="tags.`bench.role` = 'parent' and tags.bench = 'bench-killed'")
    assert len(parents) == 1 and parents[0].info.run_id == parent_id, "the resumed suite reuses its parent run"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["bench.role"] == "parent"

    _, children = _children(result.tracking_uri, result.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(f"{m}-sym60-seed{s}" for m in ("erm", "mslg")
                                                               for s in (0, 1)), "exactly one child run per trial"
    assert all(c.info.status == "FINISHED" for c in children)

    # each seed's data set prepared once and trained on by both methods: one digest per seed
    by_data = {}
    for c in children:
        by_data.setdefault(c.data.tags["bench.seed"], set()).add(
            (c.data.tags["bench.label_digest"], c.data.params["data.path"]))
    assert all(len(v) == 1 for v in by_data.values()) and len({next(iter(v)) for v in by_data.values()}) == 2
    for (digest, data_path), in by_data.values():
        assert label_digest(data_path) == digest
    assert all(client.get_run(c.info.run_id).inputs.dataset_inputs for c in children), \
        "the digest is also each run's MLflow dataset input"
    assert len(list((workdir / "bench-data").iterdir())) == 2

    # the leaderboard's means and stds are those of the child runs
    summary = result.leaderboard.summary()
    assert (summary["seeds"] == 2).all() and len(summary) == 2
    for method in ("erm", "mslg"):
        runs = [c for c in children if c.data.tags["bench.method"] == method]
        row = summary[summary["method"] == method].iloc[0]
        for metric in ("test_at_best_val", "test_accuracy"):
            values = np.array([c.data.metrics[metric] for c in runs])
            assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1))
        corrected = [c.data.metrics.get("corrected_accuracy") for c in runs]
        assert (method == "mslg") == all(v is not None for v in corrected)
    assert (summary["wall_s_mean"] > 0).all(), "each method's wall time per trial, from the runs' wall_s tag"
    text = result.leaderboard.to_markdown()
    assert "| erm |" in text and "| mslg |" in text and "test accuracy at the best validation epoch" in text
    assert "| - |" not in text and "**" in text, "the best of each column is marked"

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"leaderboard.csv", "leaderboard.md", "trials.csv", "suite.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert plots == {"plots/test_accuracy_vs_noise.png", "plots/corrected_accuracy.png"}
    csv = pd.read_csv(client.download_artifacts(result.parent_run_id, "leaderboard.csv", str(tmp_path)))
    assert len(csv) == 2 and (csv["seeds"] == 2).all()

    # the per-sample export of every trial, the interrupted one's too: one row per noisy id, probabilities summing to 1
    for c in children:
        files = {a.path for a in client.list_artifacts(c.info.run_id, "exports")}
        assert files == {"exports/predictions.parquet"}
    one = next(c for c in children if c.data.tags["bench.method"] == "mslg")
    export = pd.read_parquet(client.download_artifacts(one.info.run_id, "exports/predictions.parquet", str(tmp_path)))
    data_path = one.data.params["data.path"]
    noisy = pd.read_parquet(Path(data_path) / "noisy_train", columns=["id", "label"]).sort_values("id")
    assert list(export["id"]) == list(noisy["id"]) and list(export["given_label"]) == list(noisy["label"])
    probs = np.stack(export["pred_probs"].to_numpy())
    assert probs.shape == (len(noisy), 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5) and (probs >= 0).all()
    assert export["corrected_label"].between(0, 9).all()
    erm = next(c for c in children if c.data.tags["bench.method"] == "erm")
    erm_export = pd.read_parquet(client.download_artifacts(erm.info.run_id, "exports/predictions.parquet",
                                                           str(tmp_path / "erm")))
    assert "corrected_label" not in erm_export, "erm corrects no labels"

    # --report re-prints it from MLflow; a second run of the same suite needs --resume
    capsys.readouterr()
    assert cli.main(["bench", str(path), "--report"]) == 0
    assert text in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        metacorrect.bench(path, progress=False)


def test_leaderboard_from_child_runs_marks_the_best_and_lists_overrides(tmp_path):
    """The leaderboard read back from MLflow (as `--report` does): mean ± std per cell, the best of each column in
    bold, a cell with a missing seed counted, overrides listed, the CSV one row per (method, setting)."""
    import pandas as pd

    from metacorrect.platform import tracking
    from metacorrect.tuning.bench import _log_parent_start, load_suite
    from metacorrect.tuning.leaderboard import log_leaderboard, plot_leaderboard, read_leaderboard

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = load_suite(_suite(tmp_path, tmp_path, uri, "board", ["erm", {"name": "mlc", "label": "mlc+lr", "overrides": {"optim.lr": 0.1}}],
                             [{"noise": "symmetric:0.6", "label": "sym60"}, {"noise": "symmetric:0.4", "label": "sym40"}],
                             [0, 1]))
    parent, _ = tracking.start_run(uri, "board", "board", tmp_path / "parent", tags={"bench.role": "parent"})
    _log_parent_start(uri, parent, spec)
    scores = {("erm", "sym60"): [0.80, 0.90], ("mlc+lr", "sym60"): [0.95, 0.97], ("erm", "sym40"): [0.93, 0.95],
              ("mlc+lr", "sym40"): [0.92]}  # mlc's seed 1 at sym40 failed
    for (method, setting), values in scores.items():
        for seed, value in enumerate(values):
            run, _ = tracking.start_run(uri, "board", f"{method}-{setting}-seed{seed}", tmp_path / f"{method}{setting}{seed}",
                                        tags={"mlflow.parentRunId": parent, "bench.method": method,
                                              "bench.setting": setting, "bench.seed": str(seed),
                                              "wall_s": "30"})  # a bookkeeping tag, as a trial's run sets it
            metrics = {"test_at_best_val": value, "test_accuracy": value - 0.01}
            tracking.log_metrics(uri, run, metrics | ({"corrected_accuracy": 0.8} if method == "mlc+lr" else {}), step=1)
            tracking.end_run(uri, run, "FINISHED")
    failed, _ = tracking.start_run(uri, "board", "mlc-sym40-seed1", tmp_path / "failed",
                                   tags={"mlflow.parentRunId": parent, "bench.method": "mlc+lr", "bench.setting": "sym40",
                                         "bench.seed": "1"})
    tracking.end_run(uri, failed, "FAILED")

    board = read_leaderboard(uri, parent)
    text = board.to_markdown()
    assert "| erm | 0.8500 ± 0.0707 | **0.9400 ± 0.0141** | 30 |" in text
    assert "| mlc+lr * | **0.9600 ± 0.0141** | 0.9200 (n=1) | 30 |" in text
    assert "* mlc+lr: optim.lr=0.1" in text and "0.8000 ± 0.0000" in text  # corrected labels: mlc alone
    assert text.index("corrected-label accuracy") < text.index("* mlc+lr: optim.lr=0.1")
    csv = pd.read_csv(__import__("io").StringIO(board.to_csv()))
    assert len(csv) == 4 and list(csv["seeds"]) == [2, 2, 2, 1]
    assert set(plot_leaderboard(board)) == {"test_accuracy_vs_noise", "corrected_accuracy"}
    # the parent keeps each cell as a metric; a label MLflow would refuse in a metric name is made safe
    log_leaderboard(uri, parent, board)
    assert tracking.client(uri).get_run(parent).data.metrics["test_at_best_val.mlc_lr.sym60"] == pytest.approx(0.96)
