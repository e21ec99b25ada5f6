"""Named CIFAR protocols of the papers: clean (meta) and validation set sizes and the noise model.

`--preset NAME:RATE` fills --noise, --clean-per-class and --val-per-class (the sizes and
noise models the papers' own loaders use; docs/data.md, "Paper presets"):

  mlc-uniform   MLC/MW-Net "unif": label redrawn over all C classes (may stay), 1000 clean, 1000 val
  mlc-flip      MLC "flip": each class flips to one random other class (np.random.seed(1) map), 1000 clean
  emlc-sym      EMLC symmetric 20-90% (its loader is MLC's "unif"), 1000 clean
  emlc-asym     EMLC asymmetric (paper: Patrini pairs on CIFAR-10, next-in-superclass on CIFAR-100;
                the official code's `flip` is mlc-flip), default rate 0.4, 1000 clean
  ieg-10        IEG: uniform noise, 10 clean images per class, removed from train
  ieg-1         IEG: uniform noise, 1 clean image per class
  mwnet-a       MW-Net / Vyas setting A: uniform noise (40 or 60%), 1000 clean

The clean set is balanced, drawn per class with the seed, and disjoint from the noisy set (the official
MLC/EMLC loaders overlap them; this does not).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metacorrect.datasets.contract import DataError

PRESET_SOURCES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class Preset:
    noise: str
    clean_per_class: int
    val_per_class: int


@dataclass(frozen=True)
class _Protocol:
    noise: str  # template: {rate} and, for pair maps, {map}
    clean_total: int | None  # balanced over the classes
    clean_per_class: int | None = None
    default_rate: float | None = None


PROTOCOLS = {
    "mlc-uniform": _Protocol("symmetric:{rate}:uniform", 1000),
    "mlc-flip": _Protocol("pair:{rate}:map={map}", 1000),
    "emlc-sym": _Protocol("symmetric:{rate}:uniform", 1000),
    "emlc-asym": _Protocol("pair:{rate}:{pairs}", 1000, default_rate=0.4),
    "ieg-10": _Protocol("symmetric:{rate}:uniform", None, 10),
    "ieg-1": _Protocol("symmetric:{rate}:uniform", None, 1),
    "mwnet-a": _Protocol("symmetric:{rate}:uniform", 1000),
}


def resolve_preset(spec: str, source: str) -> Preset:
    """`NAME:RATE` (RATE in [0, 1] or a percentage) for a CIFAR source -> the prepare arguments."""
    name, _, rate_text = spec.partition(":")
    if name not in PROTOCOLS:
        raise DataError(f"preset '{name}': unknown (expected one of {', '.join(PROTOCOLS)})")
    if source not in PRESET_SOURCES:
        raise DataError(f"preset '{name}': defined for {', '.join(PRESET_SOURCES)}, not source '{source}'")
    protocol = PROTOCOLS[name]
    if not rate_text and protocol.default_rate is None:
        raise DataError(f"preset '{name}': give the noise rate, e.g. --preset {name}:0.4")
    try:
        rate = float(rate_text.rstrip("%")) / (100 if rate_text.endswith("%") else 1) if rate_text \
            else protocol.default_rate
    except ValueError:
        raise DataError(f"preset '{spec}': rate {rate_text!r} is not a number") from None
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"preset '{spec}': rate {rate} outside [0, 1]")
    classes = PRESET_SOURCES[source]
    per_class = protocol.clean_per_class or protocol.clean_total // classes
    noise = protocol.noise.format(rate=rate, map=mlc_flip_map(classes),
                                  pairs="cifar10" if classes == 10 else "cifar100")
    return Preset(noise=noise, clean_per_class=per_class, val_per_class=max(per_class, 1000 // classes))


def mlc_flip_map(num_classes: int) -> str:
    """MLC's `flip_labels_C`: with np.random.seed(1), each class i gets one random other class."""
    rng = np.random.RandomState(1)
    targets = []
    for i in range(num_classes):
        targets.append(int(rng.choice([j for j in range(num_classes) if j != i])))
    return ";".join(f"{i}>{t}" for i, t in enumerate(targets))
