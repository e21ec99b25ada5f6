"""How the run's datasets reach the workers (a Ray Train `DataConfig`).

Ray's Train DatasetManager actor unpickles this class, so this module imports nothing heavy (no torch).
"""
from __future__ import annotations

import ray.train
from ray.data import ExecutionOptions
from ray.data.context import DataContext
from ray.data.dataset import MaterializedDataset


class ExactSplitDataConfig(ray.train.DataConfig):
    """Split datasets over workers without dropping rows.

    Ray's DataConfig splits with `equal=True`, which drops up to world_size-1 rows per epoch; here
    every row reaches exactly one worker, and `global_batches` deals the uneven shards into equal global batches.
    """

    def __init__(self, datasets_to_split: list[str], deterministic: bool = False):
        options = None
        if deterministic:  # same block order every run (exactly repeatable with one worker)
            options = self.default_ingest_options()
            options.preserve_order = True
        super().__init__(datasets_to_split=datasets_to_split, execution_options=options)

    @staticmethod
    def default_ingest_options() -> ExecutionOptions:
        """Ray's defaults for data ingest, less the deprecated `exclude_resources`: Ray 2.60's own default copies
        it into every shard's options, and that copy raises a RayDeprecationWarning on the console of every run.
        It is zero unless a user set it in the DataContext, and Ray Train reserves the workers' resources apart."""
        context = DataContext.get_current().execution_options
        return ExecutionOptions(resource_limits=context.resource_limits, preserve_order=context.preserve_order,
                                verbose_progress=context.verbose_progress)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in self._datasets_to_split and isinstance(ds, MaterializedDataset):
                # Cached in the object store: a static split costs nothing, where each streaming split starts a
                # coordinator actor and an executor (~1.5 s apiece on 2 cores, before the first batch).
                for i, part in enumerate(ds.split(world_size, equal=False)):
                    output[i][name] = part.iterator()
            elif name in self._datasets_to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output
