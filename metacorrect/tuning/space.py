"""Search spaces: a plain mapping from dotted config fields to value specs, checked before any trial starts.

    optim.lr: {loguniform: [0.005, 0.2]}       # float, log-uniform between the bounds
    optim.momentum: {uniform: [0.8, 0.99]}     # float, uniform
    method.k: {choice: [1, 2, 5, 10]}          # one of the values, drawn at random (a bare list means the same)
    train.seed: {grid: [0, 1, 2]}              # every value, each combined with num_samples draws of the rest
    model.width: {randint: [16, 64]}           # integer, both bounds included
    method.logit_scale: {lograndint: [1, 1000]}  # integer, log-uniform, both bounds included

Any field of the config can be searched by its dotted name (`ExperimentConfig.flat()` lists them). Each method
declares its default space as `search_space` next to its config fields (`methods/*.py`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from metacorrect.config import ConfigError, ExperimentConfig

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint")
RANGES = ("uniform", "loguniform", "randint", "lograndint")


def default_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """The default space of the config's method."""
    from metacorrect.methods import METHODS

    return dict(METHODS[cfg.method.name].config_class.search_space)


def load_space(space: dict[str, Any] | str | Path | None, cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The space to search, normalised to {field: {kind: values}} and validated against `cfg`.

    None means the method's default space. Raises ConfigError listing every problem (unknown field,
    empty or reversed range, value the field does not accept), so nothing starts on a bad space.
    """
    where = "space"
    if space is None:
        space, where = default_space(cfg), f"default space of {cfg.method.name}"
    elif isinstance(space, (str, Path)):
        path = Path(space)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: search space file not found")
        try:
            space = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: expected a non-empty mapping of dotted config fields to value specs, "
                          f"e.g. optim.lr: {{loguniform: [0.001, 0.1]}}")
    problems: list[str] = []
    out: dict[str, dict[str, Any]] = {}
    fields = set(cfg.flat())
    for key, spec in space.items():
        key = str(key)
        normalised = _normalise(key, spec, problems)
        if normalised is None:
            continue
        if key not in fields and not _is_method_field(key, normalised, space, cfg):
            problems.append(f"{key}: unknown config field ({_field_hint(key, fields)})")
            continue
        out[key] = normalised
    if not problems:
        problems.extend(_value_problems(out, cfg))
    if problems:
        raise ConfigError([f"{where}: {p}" for p in problems])
    return out


def to_tune(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ray Tune domains for a validated space (keys stay dotted: they are config fields, not nesting)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        (kind, values), = spec.items()
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*values)
        elif kind == "randint":  # Tune's upper bound is exclusive; ours is inclusive
            out[key] = tune.randint(values[0], values[1] + 1)
        else:
            out[key] = tune.lograndint(values[0], values[1] + 1)
    return out


def space_to_yaml(space: dict[str, dict[str, Any]]) -> str:
    return yaml.safe_dump(space, sort_keys=False, default_flow_style=None)


def _normalise(key: str, spec: Any, problems: list[str]) -> dict[str, Any] | None:
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(f"{key}: expected one of {', '.join(KINDS)} with its values, e.g. "
                        f"{{choice: [1, 2]}} or {{loguniform: [0.001, 0.1]}}, got {spec!r}")
        return None
    (kind, values), = spec.items()
    if kind not in KINDS:
        problems.append(f"{key}: unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
        return None
    if not isinstance(values, list):
        problems.append(f"{key}: {kind} expects a list, got {values!r}")
        return None
    if kind in ("choice", "grid"):
        if not values:
            problems.append(f"{key}: {kind} has no values")
            return None
        return {kind: values}
    numbers = [_number(v) for v in values]
    if len(values) != 2 or any(v is None for v in numbers):
        problems.append(f"{key}: {kind} expects [low, high] numbers, got {values!r}")
        return None
    low, high = numbers
    if kind in ("randint", "lograndint"):
        if not all(float(v).is_integer() for v in values):
            problems.append(f"{key}: {kind} expects integer bounds, got {values!r}")
            return None
        low, high = int(low), int(high)
    if not low < high:
        problems.append(f"{key}: empty range [{values[0]}, {values[1]}] (low must be below high)")
        return None
    if kind.startswith("log") and low <= 0:
        problems.append(f"{key}: {kind} needs low > 0, got {values[0]}")
        return None
    return {kind: [low, high]}


def _value_problems(space: dict[str, dict[str, Any]], cfg: ExperimentConfig) -> list[str]:
    """Every choice and both ends of every range must give a valid config (e.g. method.k=0 is refused)."""
    problems: list[str] = []
    for key, spec in space.items():
        (kind, values), = spec.items()
        if key != "method.name" and "method.name" in space and key.startswith("method."):
            continue  # valid or not depending on the method drawn with it
        for value in values:  # the choices, or both ends of a range
            try:
                cfg.with_values({key: value})
            except ConfigError as e:
                problems.extend(f"{key}={value!r}: {p}" for p in e.problems)
                break
    return problems


def _is_method_field(key: str, spec: dict[str, Any], space: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """A method.* field of a method that the space also searches over (method.name)."""
    if not key.startswith("method.") or "method.name" not in space:
        return False
    from metacorrect.methods import METHODS

    names = _normalise("method.name", space["method.name"], [])
    candidates = next(iter(names.values())) if names else []
    field = key.split(".", 1)[1]
    return any(name in METHODS and field in METHODS[name].config_class.__dataclass_fields__
               for name in candidates)


def _field_hint(key: str, fields: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    section = key.split(".")[0]
    names = sorted(f for f in fields if f.startswith(section + ".")) or sorted({f.split(".")[0] for f in fields})
    return f"fields there: {', '.join(names)}"


def _number(v: Any) -> float | None:
    """A finite number; YAML 1.1 reads "1e-4" (no decimal point) as a string, so strings are parsed too."""
    if isinstance(v, bool):
        return None
    try:
        number = float(v)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
