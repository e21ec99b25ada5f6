"""Source registry: name -> loader(**options) -> SourceData (arrays) or FileSourceData (image folders)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import FileList, FileSourceData, Pool, SourceData
from metacorrect.datasets.sources.cifar import load_cifar10_source, load_cifar10n_source, load_cifar100_source
from metacorrect.datasets.sources.clothing1m import load_clothing1m_source
from metacorrect.datasets.sources.digits import load_digits_source
from metacorrect.datasets.sources.food101n import load_food101n_source
from metacorrect.datasets.sources.synthetic import load_synthetic_source

SOURCES: dict[str, Callable[..., SourceData | FileSourceData]] = {
    "digits": load_digits_source,
    "synthetic": load_synthetic_source,
    "cifar10": load_cifar10_source,
    "cifar100": load_cifar100_source,
    "cifar10n": load_cifar10n_source,
    "clothing1m": load_clothing1m_source,
    "food101n": load_food101n_source,
}


def load_source(name: str, options: dict[str, Any] | None = None) -> SourceData | FileSourceData:
    if name not in SOURCES:
        raise DataError(f"unknown source '{name}' (expected one of {', '.join(sorted(SOURCES))})")
    import inspect

    params = inspect.signature(SOURCES[name]).parameters
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in (options or {})]
    if missing:
        raise DataError(f"source '{name}': needs " + " ".join(f"--option {p}=..." for p in missing) +
                        f" (options: {', '.join(params)})")
    try:
        return SOURCES[name](**(options or {}))
    except TypeError as e:
        raise DataError(f"source '{name}': bad option ({e})") from None


__all__ = ["SOURCES", "FileList", "FileSourceData", "Pool", "SourceData", "load_source"]
