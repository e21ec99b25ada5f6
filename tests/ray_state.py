"""What Ray's State API says this test process (its Ray job) has left running: after `metacorrect.run()`
returns, no actor and no placement group of that run may remain. Other drivers on the session's cluster
(subprocesses the tests start, tests/background_runs.py) are other jobs and are not counted."""
from __future__ import annotations

import time

# Ray Data's cluster-wide services, one of each, shared by every data set: not a run's.
RAY_DATA_SERVICES = {"_StatsActor", "_AutoscalingCoordinatorActor"}


def _job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def _address() -> str:
    """The connected cluster's address: without one, the state API looks for clusters on the machine and fails
    when it finds several (other test sessions' or `ray start`'s)."""
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actors(from_gcs: bool = False) -> dict[str, str]:
    """actor id -> class name of this job's alive actors. `from_gcs`: read Ray's control store directly, for a
    cluster started without a dashboard (the state API is the dashboard's); Ray offers that read only as a
    debugging helper, so the suite's own cluster keeps the state API."""
    if from_gcs:
        import ray
        from ray._private import state

        alive = state.actors(job_id=ray.JobID.from_hex(_job()), actor_state_name="ALIVE")
        return {a["ActorID"]: a["ActorClassName"] for a in alive.values()}
    from ray.util.state import list_actors

    return {a["actor_id"]: a["class_name"]
            for a in list_actors(address=_address(), filters=[("state", "=", "ALIVE"), ("job_id", "=", _job())])}


def actors_started(class_name: str) -> int:
    """How many actors of `class_name` this job has started, alive or not."""
    from ray.util.state import list_actors

    return len(list_actors(address=_address(), filters=[("class_name", "=", class_name), ("job_id", "=", _job())],
                           limit=10000))


def train_worker_pids() -> list[int]:
    """Pids of this job's alive Ray Train workers (a test kills one by pid)."""
    from ray.util.state import list_actors

    return [a["pid"] for a in list_actors(address=_address(), filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", _job())])]


def left_behind(before: dict[str, str], wait_s: float = 10.0, from_gcs: bool = False) -> tuple[list[str], list[dict]]:
    """(actors alive now that were not in `before`, placement groups of this job not removed), once both are
    empty or after `wait_s` (actors report their death to the GCS shortly after they exit). `from_gcs`: as in
    `alive_actors`; the control store's placement-group table names no job, so there every placement group of
    the cluster counts (for a cluster with one driver)."""
    deadline = time.time() + wait_s
    while True:
        left = [name for actor, name in alive_actors(from_gcs).items()
                if actor not in before and name not in RAY_DATA_SERVICES]
        groups = [g for g in _placement_groups(from_gcs) if g["state"] != "REMOVED"]
        if not (left or groups) or time.time() > deadline:
            return left, groups
        time.sleep(0.5)


def _placement_groups(from_gcs: bool) -> list[dict]:
    if from_gcs:
        from ray.util import placement_group_table

        return list(placement_group_table().values())
    from ray.util.state import list_placement_groups

    return list_placement_groups(address=_address(), filters=[("creator_job_id", "=", _job())])
