"""Source registry: name -> loader(**options) -> SourceData. Later sources (cifar, clothing1m, ...) add a line."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import Pool, SourceData
from metacorrect.datasets.sources.digits import load_digits_source
from metacorrect.datasets.sources.synthetic import load_synthetic_source

SOURCES: dict[str, Callable[..., SourceData]] = {
    "digits": load_digits_source,
    "synthetic": load_synthetic_source,
}


def load_source(name: str, options: dict[str, Any] | None = None) -> SourceData:
    if name not in SOURCES:
        raise DataError(f"unknown source '{name}' (expected one of {', '.join(sorted(SOURCES))})")
    try:
        return SOURCES[name](**(options or {}))
    except TypeError as e:
        raise DataError(f"source '{name}': bad option ({e})") from None


__all__ = ["SOURCES", "Pool", "SourceData", "load_source"]
