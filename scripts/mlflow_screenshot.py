"""Screenshots of the MLflow UI over a store with short real runs: what a researcher sees in a real browser.

Trains three short runs on digits with 60% symmetric noise (erm, clean_only, mlc; 2 epochs each, in the driver),
the last one registering its model, and starts `mlflow server` on 127.0.0.1 over that store. Headless Chromium
(a fresh profile each time: a first-time visitor) then opens the runs table at the link metacorrect prints
(`tracking.view_path`: the "Model training" workflow, the researcher's columns) and the mlc run's page. The
server is stopped by its process group id. Not a CI test: it needs Chromium (`apt-get install -y chromium`).

    .venv/bin/python scripts/mlflow_screenshot.py [--out docs/img] [--keep WORKDIR]

Writes OUT/mlflow-runs.png (the experiment's runs table) and OUT/mlflow-run.png (one run's page).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WINDOW = "1800,900"
# The browser reaches the server (bound to 127.0.0.1) under this name, mapped to 127.0.0.1 by Chromium itself:
# MLflow's UI opens its assistant panel, over a third of the page, on a first visit to a server it sees as local
# (localhost, 127.0.0.1), and a first visit is what a fresh profile makes. The server is told to accept the name.
HOST = "mlflow.test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        print("error: chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="mlflow-shot-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from metacorrect.platform import tracking

    uri, experiment_id, run_id = train(work)
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--allowed-hosts", f"{HOST}:{port}",
         "--cors-allowed-origins", f"http://{HOST}:{port}"],
        stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        base = f"http://{HOST}:{port}"
        shoot(chromium, base + tracking.view_path(experiment_id), out / "mlflow-runs.png", work)
        shoot(chromium, f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning",
              out / "mlflow-run.png", work)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, by its group id
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote mlflow-runs.png and mlflow-run.png in {out}")
    return 0


def train(work: Path) -> tuple[str, str, str]:
    """Three short runs in one experiment; returns (tracking URI, experiment id, the mlc run's id)."""
    from metacorrect.config import ExperimentConfig
    from metacorrect.datasets.prepare import prepare
    from metacorrect.platform import tracking
    from metacorrect.platform.trainer import run

    data = work / "data" / "digits-sym60"
    if not data.exists():
        prepare("digits", data, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    results = []
    for method in ("erm", "clean_only", "mlc"):
        cfg = ExperimentConfig.from_dict({
            "data": {"path": str(data)}, "method": {"name": method},
            "train": {"epochs": 2, "batch_size": 64, "clean_batch_size": 32},
            "model": {"arch": "small_cnn", "width": 16}, "resources": {"num_workers": 0},
            "tracking": {"uri": uri, "storage_path": str(work / "runs"), "experiment": "digits-noisy-labels",
                         "register_model": "digits-student" if method == "mlc" else None}})
        results.append(run(cfg, progress=False))
    uri = tracking.resolve_tracking_uri(uri)
    return uri, tracking.experiment_id(uri, "digits-noisy-labels"), results[-1].mlflow_run_id


def shoot(chromium: str, url: str, path: Path, work: Path) -> None:
    """A fresh profile each time: the page as a first-time visitor sees it (no view remembered)."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
                    f"--user-data-dir={profile}", f"--window-size={WINDOW}", "--virtual-time-budget=30000",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=600)


def wait_for(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer {url} within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
