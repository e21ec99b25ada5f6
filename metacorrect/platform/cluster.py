"""Joining or starting the Ray cluster, shared by training runs, sweeps and Ray-based data preparation."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from metacorrect.platform import quiet
from metacorrect.platform.workers import SETUP_HOOK

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
WORKER_STARTUP = "RAY_worker_maximum_startup_concurrency"  # read by the raylet this process starts


def ensure_ray(include_dashboard: bool | None = None) -> None:
    """Join the cluster of $RAY_ADDRESS (e.g. inside `ray job submit`), else start a local one
    (RAY_ADDRESS=local starts one even where `ray start` left a cluster running). `include_dashboard`: whether a
    local cluster starts Ray's dashboard (None: Ray's default, on where its dependencies are installed); a
    cluster without one saves its processes' CPU but answers no state API (`ray list actors`), which Ray Train's
    placement-group cleaner needs to free the resources of a run whose controller was killed (a trial ASHA
    stopped): keep it for sweeps (`sweep` refuses an ASHA sweep of Ray Train trials without it)."""
    import ray

    if not ray.is_initialized():
        # No print patch: it echoes every worker print a second time through Ray Train's logger.
        env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        if quiet.verbose():  # the job's workers keep their notices too
            env[quiet.VERBOSE_ENV] = "1"
        if os.environ.get("RAY_ADDRESS", "") in ("", "local"):  # a cluster of our own: its console is ours
            if not quiet.verbose():
                env[quiet.ENV] = quiet.ray_data_console_config()
            # Ray Train's preemption watcher acts only on cloud nodes that announce preemption, and on start it
            # prints an error-level line from Ray's core to the console. Set the variable to keep it.
            if PREEMPTION_WATCHER not in os.environ:
                env[PREEMPTION_WATCHER] = "0"
            quiet.quiet_local_cluster_start()
            # A bench or sweep runs trials side by side, each a trainer, a controller and data actors with
            # fractional CPUs; on a small machine the raylet then warns on the console, once every 4x its
            # start-up concurrency (its CPU count) in worker processes, about a workload that is intended.
            os.environ.setdefault(WORKER_STARTUP, str(max(8, os.cpu_count() or 1)))
        # Inside a Ray job, Ray refuses a driver runtime_env that names the job's env vars again.
        env = {k: v for k, v in env.items() if k not in (job_runtime_env().get("env_vars") or {})}
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        # Ray Train consumes workers' reports (and notices a finished run) when it polls them, every 2 s by
        # default; at 0.5 s a checkpoint commits and a run ends up to 1.5 s sooner. Ray passes it to its
        # controller. Set the variable to keep another value.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        runtime_env: dict[str, Any] = {"env_vars": env}
        if "worker_process_setup_hook" not in job_runtime_env():
            runtime_env["worker_process_setup_hook"] = SETUP_HOOK
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, runtime_env=runtime_env,
                 include_dashboard=include_dashboard)
    quiet.quiet_this_process()


def state_api_answers(timeout_s: float = 5.0, retries: int = 2) -> bool:
    """Whether the cluster this driver joined answers Ray's state API (`ray list nodes`), which its dashboard
    serves: a cluster started with `--include-dashboard=false` does not. Ray must be up. Asked again after 1 and
    2 s, in case a dashboard that was just started is not listening yet (a cluster without one says so at once)."""
    import time

    import ray
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    for attempt in range(retries + 1):
        try:  # the address: this cluster's, not whichever "auto" finds on a machine running several
            list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=timeout_s,
                       raise_on_missing_output=False)
            return True
        except RayStateApiException:
            if attempt < retries:
                time.sleep(attempt + 1)
    return False


def job_runtime_env() -> dict[str, Any]:
    """The runtime_env of the Ray job this driver runs in ({} outside `ray job submit`)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}
