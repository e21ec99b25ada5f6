"""Sources -> canonical parquet shards -> Ray Data streams; noise models."""
from metacorrect.datasets.contract import SPLITS, DatasetMeta, DataError, read_meta
from metacorrect.datasets.prepare import prepare

__all__ = ["SPLITS", "DataError", "DatasetMeta", "prepare", "read_meta"]
