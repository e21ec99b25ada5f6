"""How the run's datasets reach the workers: a Ray Train `DataConfig`, and the splits cached in the object store
handed to the workers without Ray Train's dataset machinery.

Ray's Train DatasetManager actor unpickles these classes, so this module imports nothing heavy (no torch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import ray.train
from ray.data import ExecutionOptions
from ray.data.context import DataContext
from ray.data.dataset import Dataset, MaterializedDataset

if TYPE_CHECKING:
    from metacorrect.platform.placement import Placement


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


class RunDatasets:
    """The run's datasets as each worker takes them (`shard(name, placement)`).

    Splits cached in the object store travel with the train loop's config and each worker splits them itself,
    with the same `ExactSplitDataConfig.configure` (a static split of the block list, no actor). Streamed splits
    go through Ray Train (`ray.train.get_dataset_shard`): its DatasetManager actor and one coordinator actor
    per split. Ray Train starts that DatasetManager for every run that hands it datasets, and a worker's first
    `get_dataset_shard` waits on it: a run whose splits are all cached (digits, CIFAR-size data) starts ~2 s
    sooner on 2 cores without it (benchmarks/run_startup.py). In local mode (`num_workers: 0`, no Ray Train)
    the streamed splits travel here too (`streamed`), and the one worker reads each whole.
    """

    def __init__(self, cached: dict[str, MaterializedDataset], config: ExactSplitDataConfig,
                 streamed: dict[str, Dataset] | None = None):
        self.cached = cached
        self.config = config
        self.streamed = streamed or {}
        self._shards: dict[str, object] = {}  # this worker's, made on first use

    def __getstate__(self) -> dict:
        return {"cached": self.cached, "config": self.config, "streamed": self.streamed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cached"], state["config"], state.get("streamed"))

    def shard(self, name: str, placement: Placement):
        """This worker's `DataIterator` of dataset `name` (one per run: each epoch iterates it again)."""
        if name not in self._shards:
            if name in self.cached:
                parts = self.config.configure({name: self.cached[name]}, world_size=placement.world,
                                              worker_handles=None, worker_node_ids=None)
                self._shards[name] = parts[placement.rank][name]
            elif name in self.streamed:  # local mode: the only worker streams it whole, no split coordinator
                ds = self.streamed[name].copy(self.streamed[name])
                ds.context.execution_options = self.config._resolve_execution_options(name)
                self._shards[name] = ds.iterator()
            else:
                self._shards[name] = ray.train.get_dataset_shard(name)
        return self._shards[name]
