"""What this test process (its Ray job) has left running, read from the cluster's control store (the GCS): after
`metacorrect.run()` returns, no actor and no placement group of that run may remain. Other drivers on the same
cluster (subprocesses the tests start) are other jobs and are not counted.

The background's cluster runs without Ray's dashboard (tests/background_runs.py: its head processes cost CPU for
every second a cluster lives), and Ray's state API (`ray.util.state`) is served by the dashboard, so these helpers
read the GCS tables directly, on any cluster, as Ray's own `ray._private.state` does (a helper Ray documents for
debugging; the placement-group table is parsed here for the creating job, which Ray's parsed view leaves out)."""
from __future__ import annotations

import time

# Ray Data's cluster-wide services, one of each, shared by every data set: not a run's.
RAY_DATA_SERVICES = {"_StatsActor", "_AutoscalingCoordinatorActor"}


def _job() -> "ray.JobID":
    import ray

    return ray.JobID.from_hex(ray.get_runtime_context().get_job_id())


def _actors(state_name: str | None = None) -> list[dict]:
    """This job's actors (all, or those in `state_name`), as Ray's `state.actors` describes them."""
    from ray._private import state

    return list(state.actors(job_id=_job(), actor_state_name=state_name).values())


def alive_actors() -> dict[str, str]:
    """actor id -> class name of this job's alive actors."""
    return {a["ActorID"]: a["ActorClassName"] for a in _actors("ALIVE")}


def actors_started(class_name: str) -> int:
    """How many actors of `class_name` this job has started, alive or not."""
    return sum(a["ActorClassName"] == class_name for a in _actors())


def train_worker_pids() -> list[int]:
    """Pids of this job's alive Ray Train workers (a test kills one by pid)."""
    return [a["Pid"] for a in _actors("ALIVE") if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def left_behind(before: dict[str, str], wait_s: float = 10.0) -> tuple[list[str], list[str]]:
    """(actors alive now that were not in `before`, states of this job's placement groups not removed), once
    both are empty or after `wait_s` (actors report their death to the GCS shortly after they exit)."""
    deadline = time.time() + wait_s
    while True:
        left = [name for actor, name in alive_actors().items()
                if actor not in before and name not in RAY_DATA_SERVICES]
        groups = [s for s in _placement_group_states() if s != "REMOVED"]
        if not (left or groups) or time.time() > deadline:
            return left, groups
        time.sleep(0.5)


def _placement_group_states() -> list[str]:
    """The state of each placement group this job created."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    job = _job().binary()
    groups = (table.FromString(raw) for raw in state.state._connect_and_get_accessor().get_placement_group_table())
    return [table.PlacementGroupState.Name(g.state) for g in groups if g.creator_job_id == job]
