"""Launch a `metacorrect` command on a Ray cluster as a Ray job (`ray job submit` semantics).

The project directory travels as the job's `working_dir` (without data, runs, MLflow stores or virtualenvs:
those live on shared storage or a tracking server), the job runs in the cluster's own Python environment (the
image should have the project's requirements), and environment variables such as MLFLOW_TRACKING_URI are passed
to every process of the job. `pip="project"` asks Ray to install the project's requirements for the job: Ray then
builds a new virtualenv by copying the cluster's Python environment (minutes, and gigabytes, for a CUDA torch),
so it is an explicit choice, not the default.

The working directory is a temporary copy that Ray deletes: relative paths in the job's config
(`tracking.storage_path`, `data.path`, a SQLite MLflow store) resolve inside it, so `submit` warns about each.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metacorrect.config import ConfigError

EXCLUDES = ["/.git/", "/data/", "/mlruns/", "/runs/", "/.venv/", "/venv/", "__pycache__/", "*.egg-info/",
            ".pytest_cache/", "*.pyc"]
# Passed on from the submitting shell when set there (and not given explicitly).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobResult:
    job_id: str
    status: str  # PENDING / RUNNING (not followed) or SUCCEEDED / FAILED / STOPPED
    address: str

    @property
    def exit_code(self) -> int:
        """0 for success and for a job left running (not followed), 1 otherwise (as `ray job submit`)."""
        return 0 if self.status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def project_root(start: str | Path | None = None) -> Path:
    """The directory holding pyproject.toml and the `metacorrect` package: from `start` (default cwd) upwards,
    else where this package lives."""
    candidates = [Path(start or os.getcwd()).resolve()]
    candidates += list(candidates[0].parents)
    candidates.append(Path(__file__).resolve().parents[2])
    for d in candidates:
        if (d / "pyproject.toml").is_file() and (d / "metacorrect" / "__init__.py").is_file():
            return d
    raise ConfigError(f"--working-dir: no metacorrect project (pyproject.toml + metacorrect/) at or above "
                      f"{candidates[0]}; run from the project or pass --working-dir")


def project_requirements(root: Path) -> list[str]:
    """The `[project] dependencies` of the project's pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ConfigError("--pip project: reading pyproject.toml needs Python >= 3.11; pass --pip FILE "
                          "(a requirements.txt) or --pip none") from None
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return list(data.get("project", {}).get("dependencies", []))


def build_runtime_env(root: Path, pip: str = "none", env: dict[str, str] | None = None,
                      excludes: list[str] | None = None) -> dict[str, Any]:
    """runtime_env for the job: working_dir = the project, pip requirements, env vars."""
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": EXCLUDES + list(excludes or [])}
    if pip == "project":
        runtime_env["pip"] = project_requirements(root)
    elif pip != "none":
        path = Path(pip)
        if not path.is_file():
            raise ConfigError(f"--pip {pip}: expected project, none or a requirements file")
        runtime_env["pip"] = [line.strip() for line in path.read_text().splitlines()
                              if line.strip() and not line.strip().startswith("#")]
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)} | dict(env or {})
    runtime_env["env_vars"] = env_vars
    return runtime_env


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE, e.g. MLFLOW_TRACKING_URI=http://head:5000")
        out[key.strip()] = value
    return out


def submit(command: list[str], address: str | None = None, *, working_dir: str | Path | None = None,
           pip: str = "none", env: dict[str, str] | None = None, follow: bool = False,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, excludes: list[str] | None = None,
           out=None) -> JobResult:
    """Submit `python -m metacorrect COMMAND...` (e.g. ["run", "configs/digits_demo.yaml"]) as a Ray job.

    `address` is the head's dashboard (http://HEAD:8265; default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS).
    With `follow`, streams the job's logs to `out` (default stdout) and waits for its end.
    """
    out = out or sys.stdout
    if not command:
        raise ConfigError("submit: no command; e.g. metacorrect submit --address http://HEAD:8265 -- run CONFIG.yaml")
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: expected the Ray head's dashboard address, e.g. http://HEAD:8265 "
                          "(or set RAY_ADDRESS)")
    root = Path(working_dir).resolve() if working_dir else project_root()
    if not root.is_dir():
        raise ConfigError(f"--working-dir {root}: not a directory")
    runtime_env = build_runtime_env(root, pip, env, excludes)
    problems = ephemeral_state(command, root, runtime_env["env_vars"])
    if problems:
        print("warning: this job would keep state inside Ray's temporary working directory on the cluster, which "
              "Ray deletes when the job ends:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    entrypoint = " ".join(shlex.quote(part) for part in ["python", "-m", "metacorrect", *command])
    client = _client(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                               entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
    print(f"submitted job {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if not follow:
        print(f"  logs:   ray job logs --address {address} --follow {job_id}\n"
              f"  status: ray job status --address {address} {job_id}", file=out, flush=True)
        return JobResult(job_id, _status(client, job_id), address)
    status = follow_job(client, job_id, out)
    print(f"job {job_id}: {status}", file=out, flush=True)
    return JobResult(job_id, status, address)


def ephemeral_state(command: list[str], root: Path, env_vars: dict[str, str]) -> list[str]:
    """What a `run`, `compare`, `sweep` or `bench` job would write inside its temporary working directory (one
    line each, with the setting that fixes it); [] for other commands. A config (with its `--method` file) or a
    suite that does not load fails here, before anything is submitted."""
    from metacorrect.cli import build_parser
    from metacorrect.config import ExperimentConfig

    args = build_parser().parse_args(command)
    if args.command not in ("run", "compare", "sweep", "bench"):
        return []

    def in_job(name: str | None) -> Path | None:  # a relative path is the job's working directory's
        path = Path(name) if name else None
        return root / path if path and not path.is_file() and (root / path).is_file() else path

    if args.command == "bench":
        from metacorrect.tuning.bench import load_suite

        suite = load_suite(in_job(args.suite), args.overrides)
        cfg, data = suite.base, str(suite.raw.get("data_root") or "data")  # as written: resolved here, it is absolute
    else:
        cfg = ExperimentConfig.from_yaml(in_job(args.config), args.overrides, method=in_job(getattr(args, "method", None)))
        data = cfg.data.path
    out = []
    if not Path(cfg.tracking.storage_path).expanduser().is_absolute():
        out.append(f"tracking.storage_path '{cfg.tracking.storage_path}': checkpoints and run state would be lost, so "
                   f"the run cannot be resumed; --set tracking.storage_path=/SHARED/runs")
    if not data or not Path(data).expanduser().is_absolute():
        where = data or f"data/{cfg.data.resolved_path().name}"
        if args.command == "bench":
            out.append(f"data_root '{where}': every job would prepare the suite's data sets again; "
                       f"data_root: /SHARED/data in the suite file")
        else:
            out.append(f"data.path '{where}': every job would prepare the data set again; "
                       f"--set data.path=/SHARED/data/NAME")
    uri = cfg.tracking.uri or env_vars.get("MLFLOW_TRACKING_URI")
    if not uri or not (uri.startswith(("http://", "https://", "databricks")) or uri.startswith("sqlite:////")
                       or Path(uri).is_absolute()):
        out.append(f"MLflow store '{uri or 'mlruns/mlflow.db'}': the job's runs would be recorded there and deleted; "
                   f"--env MLFLOW_TRACKING_URI=http://TRACKING-SERVER:5000")
    return out


def _client(address: str):
    """A job client; against a cluster with token authentication, the local token is sent (as `ray job` does
    with RAY_AUTH_MODE=token)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        token = _local_token()
        if not token:
            raise ConfigError(f"--address {address}: the cluster requires a token (Ray token authentication); "
                              f"set RAY_AUTH_TOKEN or put the cluster's token in ~/.ray/auth_token") from None
        try:
            return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        except AuthenticationError:
            raise ConfigError(f"--address {address}: the cluster refused the local Ray token "
                              f"(RAY_AUTH_TOKEN or ~/.ray/auth_token); use the cluster's token") from None
    except ConnectionError as e:
        raise ConfigError(f"--address {address}: no Ray dashboard answers there ({str(e).splitlines()[0]})") from None


def _local_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def follow_job(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status name."""
    import asyncio

    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", file=out, flush=True)

    asyncio.run(tail())
    status = _status(client, job_id)
    while status not in TERMINAL:  # logs can end a moment before the status does
        time.sleep(0.5)
        status = _status(client, job_id)
    return status


def _status(client, job_id: str) -> str:
    status = client.get_job_status(job_id)
    return getattr(status, "value", str(status))
