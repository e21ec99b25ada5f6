"""Setup that every Ray worker process of a metacorrect driver runs (`worker_process_setup_hook`)."""
from __future__ import annotations

import os

SETUP_HOOK = "metacorrect.platform.workers.setup_worker"


def setup_worker() -> None:
    """Pin this worker to its own cluster for Ray's State API.

    Ray Train's PlacementGroupCleaner (the actor that frees the workers' resources of a run whose controller
    was killed, e.g. a trial that ASHA stopped) asks the State API with address "auto", which fails when
    several Ray instances run on one machine ("Found multiple active Ray instances"); the resources of every
    stopped trial then stay reserved and a sweep stalls. RAY_ADDRESS names the right cluster.
    """
    import ray

    if os.environ.get("RAY_ADDRESS", "") in ("", "local", "auto"):  # "local": a cluster of its own was started
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
