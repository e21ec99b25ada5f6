"""Faults a user meets, with real processes: a driver stopped by SIGTERM and Ctrl-C (in local mode) and started
again with the same name, a Ray Train worker killed by pid, damaged shards, labels out of range. Afterwards
MLflow holds each epoch once, no run is left RUNNING, no uncommitted checkpoint is left behind, bad input is one
line and exit status 2 before anything starts, and an error that would happen again is not retried. A driver on
Ray Train killed by SIGKILL, started again, stopped by SIGTERM and resumed is test_step_checkpoints.py's (one run
for both: each start costs a Ray Train start)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from background_runs import WORKERS_EPOCHS as EPOCHS  # the killed-worker run is shared with test_workers_e2e
from procs import set_args
from run_dirs import committed


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _history(uri: str, run_id: str, key: str = "val_accuracy") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_local_mode_run_stopped_by_sigterm_then_ctrl_c_is_killed_in_mlflow_and_resumes_to_each_epoch_once(
        local_run_stopped_twice):
    """`num_workers: 0` runs the loop in the driver without Ray Train: SIGTERM (exit 143) and Ctrl-C (exit 130)
    still end it as KILLED, and the same name resumes from its own committed checkpoint each time."""
    from metacorrect.config import ExperimentConfig
    from metacorrect.platform.trainer import run

    stopped = local_run_stopped_twice
    (sigterm, after_sigterm, _), (ctrl_c, after_ctrl_c, second_log) = stopped.starts
    assert sigterm == 143 and ctrl_c == 130, stopped.starts
    assert after_sigterm == after_ctrl_c == "KILLED" and "resuming run local" in second_log

    resumed = run(ExperimentConfig.from_yaml("configs/digits_demo.yaml", stopped.sets), progress=False)
    assert resumed.mlflow_run_id == stopped.run_id
    assert _client(stopped.uri).get_run(stopped.run_id).info.status == "FINISHED"
    assert [s for s, _ in _history(stopped.uri, stopped.run_id)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_killed_worker_is_retried_from_the_last_commit_and_every_epoch_is_logged_once(erm_two_workers_one_killed):
    result, run_dir, _, killed, managers = erm_two_workers_one_killed
    assert killed, "a worker was killed"
    # digits fits in the object store: the cached splits reach both attempts' workers with the loop's arguments
    assert managers == 0, "no Ray Train dataset manager is started for a run with nothing to stream"
    uri = result.tracking_uri
    for key in ("val_accuracy", "lr"):
        assert [s for s, _ in _history(uri, result.mlflow_run_id, key)] == list(range(1, EPOCHS + 1)), key
    assert _client(uri).get_run(result.mlflow_run_id).data.tags["epoch"] == str(EPOCHS)  # bookkeeping: a tag
    assert _client(uri).get_run(result.mlflow_run_id).info.status == "FINISHED"
    decisions = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["retry"] and not decisions[0]["deterministic"], decisions
    assert {p.name for p in run_dir.glob("checkpoint_epoch*")} == set(committed(run_dir))


def test_a_checkpoint_left_half_written_by_a_killed_worker_is_removed_and_a_live_ones_kept(tmp_path):
    """A worker writes each checkpoint in its node's temporary directory before Ray copies it into the run
    directory; killed in between, it leaves that copy behind, which the next start of any run on the node
    removes. One being written by a live process stays."""
    import subprocess
    import sys

    from metacorrect.platform.records import STAGING_PREFIX, remove_orphaned_staging

    writer = ("import time\n"
              "from metacorrect.platform.records import staging_dir\n"
              "d = staging_dir('checkpoint_epoch0002'); (d / 'model.pt').write_bytes(b'x' * 1000)\n"
              "print(d, flush=True); time.sleep(600)\n")
    killed = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"TMPDIR": str(tmp_path)})
    try:
        left = Path(killed.stdout.readline().strip())
        assert left.parent == tmp_path and (left / "model.pt").is_file()
    finally:
        killed.kill()  # SIGKILL, by pid: no cleanup code of its own runs
        killed.wait()
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-checkpoint_epoch0003-x1y2"  # this process's, being written
    live.mkdir()
    assert left.exists()
    assert remove_orphaned_staging(tmp_path) == 1 and not left.exists()
    assert live.exists(), "a live writer's directory is never removed"


# ---- bad data --------------------------------------------------------------------------------------------------
def _copy(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy, sorted((copy / "noisy_train").glob("part-*.parquet"))[0]


def _rewrite(shard: Path, column: str, change) -> None:
    table = pq.read_table(shard)
    values = change(table[column].to_pylist())
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type)),
                   shard)


def _cli_lines(capsys, argv: list[str]) -> tuple[int, list[str]]:
    from metacorrect import cli

    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_truncated_shard_is_one_line_naming_it_before_anything_starts(digits_noisy, tmp_path, capsys):
    data, shard = _copy(digits_noisy, tmp_path)
    os.truncate(shard, 1000)
    db = tmp_path / "mlruns.db"
    args = ["run", "configs/digits_demo.yaml", *set_args([f"data.path={data}", f"tracking.uri=sqlite:///{db}",
                                                          f"tracking.storage_path={tmp_path / 'runs'}"])]
    code, err = _cli_lines(capsys, args)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {shard}: not a readable parquet shard (Parquet magic bytes not found"), err
    assert not db.exists() and not (tmp_path / "runs").exists(), "no MLflow run opened, nothing written"
    code, err = _cli_lines(capsys, ["data", "inspect", str(data)])
    assert code == 2 and len(err) == 1 and str(shard) in err[0], err


def test_labels_out_of_range_and_bad_ids_are_named_by_file_and_row(digits_noisy, tmp_path, capsys):
    from metacorrect.datasets.contract import DataError, read_meta
    from metacorrect.datasets.validate import check_dataset

    data, shard = _copy(digits_noisy, tmp_path)
    _rewrite(shard, "label", lambda v: v[:7] + [99] + v[8:])
    first_id = pq.read_table(shard, columns=["id"])["id"][7].as_py()
    code, err = _cli_lines(capsys, ["run", "configs/digits_demo.yaml", *set_args([
        f"data.path={data}", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
        f"tracking.storage_path={tmp_path / 'runs'}"])])
    assert code == 2 and err == [f"error: {shard}: row 7 (id {first_id}): label 99 outside [0, 10)"], err

    _rewrite(shard, "label", lambda v: v[:7] + [1] + v[8:])
    _rewrite(shard, "true_label", lambda v: [-2] + v[1:])
    _rewrite(shard, "id", lambda v: v[:3] + [v[2]] + v[4:])  # id of row 2 twice, id of row 3 missing
    with pytest.raises(DataError) as e:
        check_dataset(data, read_meta(data))
    lines = str(e.value).splitlines()
    assert any(f"{shard}: row 0 (id " in line and "true_label -2 outside [-1, 10)" in line for line in lines), lines
    assert any(f"{data / 'noisy_train'}: id " in line and "occurs 2 times" in line for line in lines), lines
    meta_file = data / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["counts"]["val"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"{data / 'val'}: shards hold .* rows, meta.json says"):
        check_dataset(data, read_meta(data))


@pytest.mark.slow
def test_a_damaged_image_fails_the_run_once_with_one_line_and_is_not_retried(ray_cluster, digits_noisy, tmp_path,
                                                                            capsys):
    data, shard = _copy(digits_noisy, tmp_path)
    _rewrite(shard, "image", lambda v: v[:5] + [v[5][:10]] + v[6:])  # raw 8x8 pixels cut to 10 bytes
    bad_id = pq.read_table(shard, columns=["id"])["id"][5].as_py()
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    from ray_state import actors_started

    managers = actors_started("DatasetManager")
    # Not cached in the object store, so the shard is read inside the Ray Train workers.
    code, err = _cli_lines(capsys, [
        "run", "configs/digits_demo.yaml", "--name", "damaged", *set_args([
            f"data.path={data}", f"tracking.uri={uri}", f"tracking.storage_path={tmp_path / 'runs'}",
            "data.cache_mb=0", "resources.num_workers=2", "resources.max_failures=2", "model.width=8"])])
    expected = f"{shard}: the image of id {bad_id} does not decode as raw 8x8x1"
    assert code == 1 and err[-1].startswith(f"error: run damaged failed: {expected}"), err[-3:]
    run_dir = tmp_path / "runs" / "damaged"
    decisions = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["raise"], "raised at the first attempt, max_failures unused"
    assert decisions[0]["deterministic"] and all(e.startswith(expected) for e in decisions[0]["errors"].values())
    assert _client(uri).get_run(_run_id(run_dir)).info.status == "FAILED"
    assert actors_started("DatasetManager") > managers, "streamed splits go through Ray Train's dataset manager"
