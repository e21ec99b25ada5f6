"""Joining or starting the Ray cluster, shared by training runs and Ray-based data preparation."""
from __future__ import annotations

import logging
import os

from metacorrect.platform import quiet


def ensure_ray() -> None:
    """Join the cluster of $RAY_ADDRESS (e.g. inside `ray job submit`), else start a local one."""
    import ray

    if not ray.is_initialized():
        # No print patch: it echoes every worker print a second time through Ray Train's logger.
        env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        if not os.environ.get("RAY_ADDRESS"):
            env[quiet.ENV] = quiet.ray_data_console_config()
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING,
                 runtime_env={"env_vars": env})
    quiet.quiet_this_process()
