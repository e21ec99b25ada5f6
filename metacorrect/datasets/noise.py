"""Label-noise models: inject seeded, reproducible label noise into clean labels.

Every model records its transition matrix T, with T[i, j] = P(noisy = j | true = i).
Two corruption conventions from the papers we reproduce are supported:
  * "sampled" (default): each sample draws its noisy label from its row of T (MW-Net, MLC, EMLC, IEG);
  * "exact": exactly round(rate * n) samples are corrupted (MSLG, L2RW).
Spec strings such as ``symmetric:0.6`` or ``pair:0.4:cifar10`` come from the command line (``--noise``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

KINDS = ("none", "symmetric", "pair", "instance")
VARIANTS = ("flip", "uniform")
BUILTIN_MAPS = ("next", "cifar10", "cifar100")
# Class-dependent CIFAR-10 flips (Patrini et al. 2017): truck->automobile, bird->airplane, cat<->dog, deer->horse.
CIFAR10_PAIRS = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))
INSTANCE_STD = 0.1  # std of the per-sample flip rates in Xia et al. 2020
FEATURE_CHUNK = 8192  # rows fetched per call, so huge image sets never need to sit in memory at once

FeatureSource = Union[np.ndarray, Callable[[np.ndarray], np.ndarray]]


class NoiseSpecError(ValueError):
    """Invalid noise specification or input; the message says what was given and what was expected."""


def _parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """Parse an explicit class map 'SRC>TGT;SRC>TGT'; class ranges are checked later, once C is known."""
    pairs: list[tuple[int, int]] = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        src, sep, tgt = item.partition(">")
        try:
            pair = (int(src), int(tgt)) if sep else None
        except ValueError:
            pair = None
        if pair is None or min(pair) < 0:
            raise NoiseSpecError(f"bad class map entry '{item}' (expected SRC>TGT with class indices, e.g. '2>0;3>5')")
        if pair[0] == pair[1]:
            raise NoiseSpecError(f"class map entry '{item}' maps a class to itself")
        if any(pair[0] == s for s, _ in pairs):
            raise NoiseSpecError(f"class map gives class {pair[0]} more than one target")
        pairs.append(pair)
    if not pairs:
        raise NoiseSpecError(f"empty class map '{text}' (expected e.g. '2>0;3>5')")
    return tuple(pairs)


@dataclass(frozen=True)
class NoiseSpec:
    kind: str  # "none" | "symmetric" | "pair" | "instance"
    rate: float  # 0 <= rate <= 1
    variant: str = "flip"  # symmetric only: "flip" (always changes the class) or "uniform" (may keep it)
    exact: bool = False  # True: exactly round(rate * n) samples corrupted; False: sampled from T per sample
    class_map: str = "next"  # pair only: "next", "cifar10", "cifar100" or explicit "2>0;3>5"

    def __post_init__(self) -> None:
        # Validate eagerly so that every spec in circulation is well formed and round-trips through its string.
        if self.kind not in KINDS:
            raise NoiseSpecError(f"unknown kind '{self.kind}' (expected one of {', '.join(KINDS)})")
        try:
            rate = float(self.rate)
        except (TypeError, ValueError):
            raise NoiseSpecError(f"rate {self.rate!r} is not a number (expected a float in [0, 1])") from None
        if isinstance(self.rate, bool) or not 0.0 <= rate <= 1.0:  # NaN fails the comparison too
            raise NoiseSpecError(f"rate {self.rate!r} outside [0, 1]")
        object.__setattr__(self, "rate", rate)
        if self.kind == "none" and rate != 0.0:
            raise NoiseSpecError(f"kind 'none' takes no rate (got {rate})")
        if self.variant not in VARIANTS:
            raise NoiseSpecError(f"unknown variant '{self.variant}' (expected one of {', '.join(VARIANTS)})")
        if self.variant != "flip" and self.kind != "symmetric":
            raise NoiseSpecError(f"variant '{self.variant}' applies only to symmetric noise, not {self.kind}")
        if self.exact and self.kind not in ("symmetric", "pair"):
            raise NoiseSpecError(f"exact counts apply only to symmetric and pair noise, not {self.kind}")
        if self.class_map not in BUILTIN_MAPS:  # explicit map: store its canonical spelling
            canonical = ";".join(f"{s}>{t}" for s, t in _parse_pairs(str(self.class_map)))
            object.__setattr__(self, "class_map", canonical)
        if self.class_map != "next" and self.kind != "pair":
            raise NoiseSpecError(f"class map '{self.class_map}' applies only to pair noise, not {self.kind}")

    @property
    def is_none(self) -> bool:
        return self.kind == "none" or self.rate == 0.0

    def to_string(self) -> str:
        """Canonical string (only non-default options spelled); ``parse_noise(s.to_string()) == s``."""
        parts = [self.kind] if self.kind == "none" else [self.kind, repr(self.rate)]  # repr round-trips floats
        if self.variant != "flip":
            parts.append(self.variant)
        if self.exact:
            parts.append("exact")
        if self.class_map != "next":
            parts.append(self.class_map if self.class_map in BUILTIN_MAPS else f"map={self.class_map}")
        return ":".join(parts)

    __str__ = to_string


def _parse_rate(token: str) -> float:
    text, scale = (token[:-1], 100.0) if token.endswith("%") else (token, 1.0)
    try:
        rate = float(text) / scale
    except ValueError:
        raise NoiseSpecError(f"rate '{token}' is not a number (expected a float in [0, 1], e.g. 0.4 or 40%)") from None
    if not 0.0 <= rate <= 1.0:
        raise NoiseSpecError(f"rate {token} outside [0, 1]")
    return rate


def _parse(text: str) -> NoiseSpec:
    tokens = [t.strip() for t in text.strip().split(":")]
    kind = tokens[0].lower()
    if kind not in KINDS:
        raise NoiseSpecError(f"unknown kind '{tokens[0]}' (expected one of {', '.join(KINDS)})")
    if kind == "none":
        if len(tokens) > 1:
            raise NoiseSpecError("kind 'none' takes no rate or options")
        return NoiseSpec("none", 0.0)
    if len(tokens) < 2 or not tokens[1]:
        raise NoiseSpecError(f"missing rate (expected e.g. '{kind}:0.4')")
    rate = _parse_rate(tokens[1])
    fields: dict[str, object] = {}
    for token in tokens[2:]:
        low = token.lower()
        if low in ("exact", "sampled"):
            key, value = "exact", low == "exact"
        elif low in VARIANTS:
            key, value = "variant", low
        elif low in BUILTIN_MAPS:
            key, value = "class_map", low
        elif low.startswith("map="):
            key, value = "class_map", token[4:]
        else:
            raise NoiseSpecError(f"unknown option '{token}' (expected exact, sampled, flip, uniform, "
                                 f"{', '.join(BUILTIN_MAPS)} or map=SRC>TGT;...)")
        if key in fields and fields[key] != value:
            raise NoiseSpecError(f"option '{token}' conflicts with an earlier option")
        fields[key] = value
    return NoiseSpec(kind, rate, **fields)  # type: ignore[arg-type]


def parse_noise(text: str) -> NoiseSpec:
    """Parse ``KIND[:RATE][:OPTION]...`` (e.g. ``symmetric:0.6:uniform``, ``pair:0.4:map=2>0;3>5``)."""
    try:
        return _parse(str(text))
    except NoiseSpecError as err:
        raise NoiseSpecError(f"noise '{text}': {err}") from None


@dataclass
class NoiseResult:
    noisy_labels: np.ndarray  # int64, same shape as the true labels
    transition: np.ndarray  # (C, C) model T; for instance noise the empirical one (no matrix model)
    empirical: np.ndarray  # (C, C) row-normalised (true, noisy) counts actually produced
    actual_rate: float  # fraction of samples whose label changed
    description: str  # human-readable sentence


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise NoiseSpecError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise NoiseSpecError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise NoiseSpecError(f"{what} contain {bad.flat[0]}, outside [0, {num_classes})")
    return arr


def _pair_targets(spec: NoiseSpec, num_classes: int, coarse_of_class: Optional[np.ndarray]) -> np.ndarray:
    """target[c] = class that c flips to under pair noise; target[c] == c means c has no partner."""
    target = np.arange(num_classes, dtype=np.int64)
    where = f"noise '{spec}'"
    if spec.class_map == "next":
        return (target + 1) % num_classes
    if spec.class_map == "cifar100":
        if coarse_of_class is None:
            raise NoiseSpecError(f"{where}: class map 'cifar100' needs coarse_of_class (the superclass of each class)")
        coarse = np.asarray(coarse_of_class).reshape(-1)
        if coarse.size != num_classes:
            raise NoiseSpecError(f"{where}: coarse_of_class has {coarse.size} entries, expected {num_classes}")
        for superclass in np.unique(coarse):
            members = np.flatnonzero(coarse == superclass)  # increasing fine-class index
            target[members] = np.roll(members, -1)  # next member, cyclic: a permutation within the superclass
        return target
    if spec.class_map == "cifar10":
        if num_classes != 10:
            raise NoiseSpecError(f"{where}: class map 'cifar10' needs 10 classes, got {num_classes}")
        pairs = CIFAR10_PAIRS
    else:
        pairs = _parse_pairs(spec.class_map)
    for src, tgt in pairs:
        if max(src, tgt) >= num_classes:
            raise NoiseSpecError(f"{where}: class map entry '{src}>{tgt}' has a class outside [0, {num_classes})")
        target[src] = tgt
    return target


def transition_matrix(spec: NoiseSpec, num_classes: int, coarse_of_class: Optional[np.ndarray] = None) -> np.ndarray:
    """The model's T (rows sum to 1) for none/symmetric/pair noise."""
    c, r = _check_num_classes(num_classes), spec.rate
    if spec.kind == "none":
        return np.eye(c)
    if spec.kind == "symmetric":
        if spec.variant == "uniform":
            return (1.0 - r) * np.eye(c) + r / c
        t = np.full((c, c), r / (c - 1))
        np.fill_diagonal(t, 1.0 - r)
        return t
    if spec.kind == "pair":
        target = _pair_targets(spec, c, coarse_of_class)
        src = np.flatnonzero(target != np.arange(c))
        t = np.eye(c)
        t[src, src], t[src, target[src]] = 1.0 - r, r
        return t
    raise NoiseSpecError(f"noise '{spec}': instance-dependent noise has no fixed transition matrix "
                         "(use apply_noise(...).transition, the empirical one)")


def empirical_transition(true_labels: np.ndarray, noisy_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised (true, noisy) counts; classes with no samples get an identity row."""
    c = _check_num_classes(num_classes)
    t = _check_labels(true_labels, c, "true labels").reshape(-1)
    z = _check_labels(noisy_labels, c, "noisy labels").reshape(-1)
    if t.shape != z.shape:
        raise NoiseSpecError(f"true and noisy labels differ in size ({t.size} vs {z.size})")
    counts = np.bincount(t * c + z, minlength=c * c).reshape(c, c).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.eye(c), where=totals > 0)


def _matrix_noise(spec: NoiseSpec, y: np.ndarray, c: int, rng: np.random.Generator,
                  coarse_of_class: Optional[np.ndarray]) -> tuple[np.ndarray, str]:
    noisy, r = y.copy(), spec.rate
    if spec.kind == "none":
        return noisy, "no label noise"
    target = _pair_targets(spec, c, coarse_of_class) if spec.kind == "pair" else None
    eligible = target[y] != y if target is not None else np.ones(y.size, dtype=bool)
    if spec.exact:
        pool = np.flatnonzero(eligible)
        chosen = pool[rng.choice(pool.size, size=round(r * pool.size), replace=False)]
    else:
        chosen = np.flatnonzero((rng.random(y.size) < r) & eligible)
    k = chosen.size
    if target is not None:
        noisy[chosen] = target[y[chosen]]
        name, what = f"pair noise (class map {spec.class_map})", "labels whose class has a partner flipped to it"
    elif spec.variant == "flip":
        noisy[chosen] = (y[chosen] + rng.integers(1, c, size=k)) % c  # non-zero offset mod C: uniform *other* class
        name, what = "symmetric flip noise", "labels flipped to a uniformly random other class"
    else:
        noisy[chosen] = rng.integers(0, c, size=k)  # may redraw the true class, as MW-Net/MLC "unif"
        name = f"symmetric uniform noise (expected label change {r * (1 - 1 / c):.3g})"
        what = f"labels resampled uniformly over all {c} classes"
    how = f"exactly {k} of {int(eligible.sum())} {what}" if spec.exact else "sampled per sample from T"
    return noisy, f"{name}, rate {r:g}, {how}"


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, n: int) -> np.ndarray:
    """normal(mean, std) truncated to [0, 1] by rejection (like scipy's truncnorm, without scipy)."""
    out = rng.normal(mean, std, n)
    bad = np.flatnonzero((out < 0) | (out > 1))
    while bad.size:
        out[bad] = rng.normal(mean, std, bad.size)
        bad = bad[(out[bad] < 0) | (out[bad] > 1)]
    return out


def _instance_noise(rate: float, y: np.ndarray, c: int, rng: np.random.Generator,
                    features: Optional[FeatureSource]) -> tuple[np.ndarray, int]:
    """Part-/instance-dependent noise of Xia et al. 2020; returns (noisy labels, feature dimension)."""
    if features is None:
        raise NoiseSpecError("instance noise needs image features (an (N, D) array or a callable index -> features)")
    n = y.size
    if callable(features):
        fetch = features
    else:
        array = np.asarray(features)
        if array.shape[0] != n:
            raise NoiseSpecError(f"instance noise: features have {array.shape[0]} rows, expected {n} (one per label)")
        fetch = array.__getitem__  # same chunked path as a callable, so both give bit-identical labels
    flip_rate = _truncated_normal(rng, rate, INSTANCE_STD, n)
    uniform = rng.random(n)  # drawn up front so the result does not depend on chunking
    noisy = np.empty(n, dtype=np.int64)
    w: Optional[np.ndarray] = None
    for start in range(0, n, FEATURE_CHUNK):
        idx = np.arange(start, min(start + FEATURE_CHUNK, n))
        x = np.asarray(fetch(idx), dtype=np.float32)
        if x.shape[:1] != idx.shape:
            raise NoiseSpecError(f"instance noise: feature source returned {x.shape[:1]} rows for {idx.size} indices")
        x = x.reshape(idx.size, -1)
        if w is None:  # float32 keeps W (C x D x C) affordable for image-sized D
            w = rng.standard_normal((c, x.shape[1], c), dtype=np.float32)
        elif x.shape[1] != w.shape[1]:
            raise NoiseSpecError(f"instance noise: feature dimension changed from {w.shape[1]} to {x.shape[1]}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # never in place: may be caller's data
        yc, rows = y[idx], np.arange(idx.size)
        scores = np.empty((idx.size, c))
        for cls in np.unique(yc):  # group by class: each group uses its own projection W[y]
            mask = yc == cls
            scores[mask] = x[mask] @ w[cls]
        scores[rows, yc] = -np.inf  # the true class only keeps 1 - q below
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p *= (flip_rate[idx] / p.sum(axis=1))[:, None]
        p[rows, yc] = 1.0 - flip_rate[idx]
        # Inverse-CDF categorical draw, vectorised over the chunk.
        noisy[idx] = np.minimum((np.cumsum(p, axis=1) <= uniform[idx, None]).sum(axis=1), c - 1)
    return noisy, 0 if w is None else w.shape[1]


def apply_noise(spec: NoiseSpec, true_labels: np.ndarray, num_classes: int, seed: int,
                features: Optional[FeatureSource] = None,
                coarse_of_class: Optional[np.ndarray] = None) -> NoiseResult:
    """Corrupt ``true_labels`` according to ``spec``; same seed and inputs give identical labels."""
    c = _check_num_classes(num_classes)
    labels = _check_labels(true_labels, c, "true labels")
    y = labels.reshape(-1)
    rng = np.random.default_rng(seed)
    if spec.kind == "instance":
        if spec.rate == 0.0:
            noisy, description = y.copy(), "no label noise (instance-dependent, rate 0)"
        else:
            noisy, dim = _instance_noise(spec.rate, y, c, rng, features)
            description = (f"instance-dependent noise (Xia et al. 2020), rate {spec.rate:g}, "
                           f"per-sample rates ~ N({spec.rate:g}, {INSTANCE_STD}) on [0, 1], feature dim {dim}")
        transition = None
    else:
        transition = transition_matrix(spec, c, coarse_of_class)
        noisy, description = _matrix_noise(spec, y, c, rng, coarse_of_class)
    empirical = empirical_transition(y, noisy, c)
    return NoiseResult(
        noisy_labels=noisy.reshape(labels.shape),
        transition=empirical.copy() if transition is None else transition,
        empirical=empirical,
        actual_rate=float(np.mean(noisy != y)) if y.size else 0.0,
        description=description,
    )
