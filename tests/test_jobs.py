"""`metacorrect submit`: a real Ray head (`ray start --head` on 127.0.0.1) and a real `mlflow server`, both
started here in their own process groups on free ports and temp dirs, and stopped after (never `ray stop`,
which would stop every Ray instance on the machine, including the test session's)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from metacorrect.config import ConfigError
from procs import stop_group

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # answering (e.g. 401 from a head with token authentication)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster of its own (ports and temp dir apart from the session's cluster) with token
    authentication on and a token of its own, which this module's clients find through RAY_AUTH_TOKEN_PATH.
    One per module: a head costs ~30 s to start and stop here."""
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="mcray", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    previous = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version", 180)  # a loaded 2-core box starts the dashboard slowly
        yield address
    finally:
        stop_group(start.pid)  # every process of this head stays in the group of `ray start`
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = previous


@pytest.fixture
def mlflow_server(tmp_path):
    (port,) = _free_ports(1)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        # MLflow's job runner (seven huey processes for its GenAI jobs) would cost the suite 20 CPU-seconds for nothing
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", 300, server)  # mlflow server's first start creates its tables: minutes on a loaded box
        yield uri
    finally:
        stop_group(server.pid)


def test_runtime_env_ships_the_project_without_data_and_forwards_tracking(monkeypatch):
    from metacorrect.platform.jobs import build_runtime_env, parse_env, project_root

    root = project_root(ROOT / "metacorrect" / "platform")
    assert root == ROOT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    env = build_runtime_env(root, "project", parse_env(["EXTRA=1"]))
    assert env["working_dir"] == str(ROOT)
    assert {"/data/", "/mlruns/", "/.venv/", "/runs/", "/.git/"} <= set(env["excludes"])
    assert any(r.startswith("ray[") for r in env["pip"]) and any(r.startswith("mlflow") for r in env["pip"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://tracking:5000", "EXTRA": "1"}
    assert "pip" not in build_runtime_env(root), "by default the job runs in the cluster's own environment"
    assert "pip" not in build_runtime_env(root, "none")
    with pytest.raises(ConfigError, match="--env 'X': expected KEY=VALUE"):
        parse_env(["X"])
    with pytest.raises(ConfigError, match="--pip nope.txt: expected project, none or a requirements file"):
        build_runtime_env(root, "nope.txt")


def test_submit_names_every_path_the_job_would_lose_with_its_working_directory(monkeypatch, capsys):
    from metacorrect import cli
    from metacorrect.platform.jobs import ephemeral_state

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lost = ephemeral_state(["run", "configs/digits_demo.yaml"], ROOT, {})
    assert len(lost) == 3
    assert lost[0].startswith("tracking.storage_path 'runs': ") and "--set tracking.storage_path=/SHARED/runs" in lost[0]
    assert lost[1].startswith("data.path 'data/digits-symmetric-0.6-clean10-seed0': ") and "/SHARED/data" in lost[1]
    assert lost[2].startswith("MLflow store 'mlruns/mlflow.db': ") and "MLFLOW_TRACKING_URI=" in lost[2]
    shared = ["--set", "tracking.storage_path=/shared/runs", "--set", "data.path=/shared/data/digits"]
    assert ephemeral_state(["sweep", "configs/digits_mlc.yaml", *shared], ROOT,
                           {"MLFLOW_TRACKING_URI": "http://tracking:5000"}) == []
    assert ephemeral_state(["data", "inspect", "/shared/data/digits"], ROOT, {}) == []
    # `run --method FILE` is checked as it will run: a bad method file fails here, before anything is sent
    with pytest.raises(ConfigError, match="method file not found"):
        ephemeral_state(["run", "configs/base/digits.yaml", "--method", "configs/methods/nope.yaml"], ROOT, {})
    assert len(ephemeral_state(["run", "configs/base/digits.yaml", "--method", "configs/methods/mlc.yaml"], ROOT, {})) == 3
    # a suite: its base's storage and store, and where it prepares its data sets (data_root as written)
    bench = ephemeral_state(["bench", "configs/suites/digits-quick.yaml", "--set", "tracking.storage_path=/shared/runs"],
                            ROOT, {"MLFLOW_TRACKING_URI": "http://tracking:5000"})
    assert len(bench) == 1 and bench[0].startswith("data_root 'data': ") and "in the suite file" in bench[0], bench
    # The warning comes before anything is sent (here to an address where nothing answers: exit 2).
    assert cli.main(["submit", "--address", "http://127.0.0.1:9", "--", "run", "configs/digits_demo.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: this job would keep state inside Ray's temporary working directory")
    assert [line.split(":")[0].strip() for line in err[1:4]] == ["tracking.storage_path 'runs'", "data.path 'data/digits-symmetric-0.6-clean10-seed0'", "MLflow store 'mlruns/mlflow.db'"]
    assert err[-1].startswith("error: --address http://127.0.0.1:9: no Ray dashboard answers there")


@pytest.mark.slow
def test_submit_runs_a_digits_job_whose_run_and_artifacts_reach_the_mlflow_server(
        ray_head, mlflow_server, digits_noisy, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from metacorrect import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = cli.main([
        "submit", "--address", ray_head, "--env", f"MLFLOW_TRACKING_URI={mlflow_server}",
        "--follow", "--", "run", "configs/digits_demo.yaml", "--set", f"data.path={digits_noisy}",
        "--set", "train.epochs=1", "--set", "resources.num_workers=1", "--set", "model.width=8",
        "--set", "train.eval_noisy=off", "--set", f"tracking.storage_path={tmp_path / 'runs'}",
        "--set", "tracking.experiment=jobs"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out[-3000:]
    assert "warning:" not in captured.err, "shared paths and a tracking server: nothing to warn about"
    job_id = re.search(r"submitted job (\S+) to", out).group(1)
    assert f"job {job_id}: SUCCEEDED" in out
    assert "[metacorrect] epoch 1/1" in out, "--follow streams the job's logs"
    from metacorrect.platform.jobs import _client

    assert "pip" not in (_client(ray_head).get_job_info(job_id).runtime_env or {}), "no environment built for it"

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "model", "plots"} <= artifacts
    model = Path(client.download_artifacts(run_id, "model/model.pt", str(tmp_path)))
    assert model.stat().st_size > 1000, "artifacts went through the server to its artifact store"

    assert cli.main(["submit", "--address", ray_head, "--follow", "--", "data", "inspect",
                     "/does/not/exist"]) == 1, "a failed job gives a non-zero exit status"
    assert cli.main(["submit", "--address", ray_head, "--", "run", "configs/does_not_exist.yaml"]) == 2, \
        "a config that does not load is refused before anything is submitted"


@pytest.mark.slow
def test_plain_ray_job_submit_needs_ray_auth_mode_token(ray_head):
    """What the README tells users of `ray job submit`: against a head with token authentication, the Ray CLI
    sends the token only with RAY_AUTH_MODE=token."""
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--", "python", "-c", "print('job ran')"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "RAY_AUTH_MODE" in refused.stdout + refused.stderr
    done = subprocess.run(command, env=env | {"RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "job ran" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
