"""Typed experiment configuration: dataclasses, YAML in/out, `a.b=c` overrides, validation.

Every problem is reported as one line naming the dotted field and what was expected, and all
problems of a config are reported together, before anything (Ray, MLflow, data) is started.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from metacorrect.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, UNIT_OPEN, field_problems, one_of
from metacorrect.errors import ConfigError  # noqa: F401  (where users and the CLI import it from)
from metacorrect.methods.base import ENGINE_FIELDS, MethodConfig


@dataclass
class PrepareConfig:
    """How the data set at `data.path` is made when it does not exist yet."""

    source: str = "digits"  # digits | synthetic | cifar10 | cifar100 | cifar10n | clothing1m | food101n
    noise: str = "symmetric:0.6"  # label noise model, as `metacorrect data prepare --noise`
    clean_per_class: int = 10  # clean (meta) images per class: the clean_train split
    val_per_class: int = 20  # clean validation images per class (model selection)
    test_fraction: float = 0.2  # only for sources without a test split of their own
    seed: int = 0  # seed of the splits and of the noise
    options: dict[str, Any] = field(default_factory=dict)  # source-specific, e.g. synthetic n / image_size

    def validate(self) -> list[str]:
        from metacorrect.datasets.noise import NoiseSpecError, parse_noise
        from metacorrect.datasets.sources import SOURCES

        problems = []
        if self.source not in SOURCES:
            problems.append(f"data.prepare.source: unknown source '{self.source}' "
                            f"(expected one of {', '.join(sorted(SOURCES))})")
        try:
            parse_noise(self.noise)
        except NoiseSpecError as e:
            problems.append(f"data.prepare.noise: {e}")
        return problems + field_problems("data.prepare", self, {
            "clean_per_class": NON_NEGATIVE, "val_per_class": NON_NEGATIVE, "test_fraction": UNIT_OPEN})


@dataclass
class DataConfig:
    """The prepared data set a run trains on, and how the training batches are read."""

    path: str | None = None  # prepared data set directory; default: data/<name derived from prepare>
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: str = "none"  # none | shift | crop_flip (random, on the worker's device, training batches only)
    shuffle_buffer: int = 4096  # rows in each worker's local shuffle buffer
    cache_mb: int = 1024  # splits that fit (decoded) are kept in Ray's object store instead of re-read each epoch
    deterministic: bool = False  # preserve block order so seeded runs repeat exactly (slower at scale)

    def validate(self) -> list[str]:
        from metacorrect.datasets.stream import AUGMENTS

        return field_problems("data", self, {"augment": one_of(AUGMENTS), "cache_mb": NON_NEGATIVE,
                                             "shuffle_buffer": NON_NEGATIVE})

    def resolved_path(self) -> Path:
        if self.path:
            return Path(self.path).expanduser().resolve()
        p = self.prepare
        noise = p.noise.replace(":", "-").replace(";", "_").replace(">", "to").replace("=", "")
        return Path("data", f"{p.source}-{noise}-clean{p.clean_per_class}-seed{p.seed}").resolve()


@dataclass
class ModelConfig:
    """The student network (meta-models that need a backbone, such as EMLC's teacher, use the same)."""

    arch: str = "small_cnn"  # small_cnn | mlp | resnet18 | resnet34 | resnet50 (+ _cifar for the 3x3 stem)
    width: int = 32  # base channels / hidden units of the small models
    pretrained: str | None = None  # path to a torchvision state dict (no downloads)
    channels_last: bool = False  # convnets in NHWC memory order (faster convolutions on GPU tensor cores)

    def validate(self) -> list[str]:
        from metacorrect.methods.backbones import ARCHS

        problems = []
        if self.arch not in ARCHS:
            problems.append(f"model.arch: unknown architecture '{self.arch}' (expected one of {', '.join(ARCHS)})")
        problems += field_problems("model", self, {"width": AT_LEAST_ONE})
        if self.pretrained and not Path(self.pretrained).expanduser().is_file():
            problems.append(f"model.pretrained: file not found: {self.pretrained}")
        return problems


@dataclass
class OptimConfig:
    """The student's optimizer: SGD, whose step the meta methods' look-ahead follows."""

    lr: float = 0.05  # learning rate (the look-ahead of the meta methods uses its current value)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay (L2)
    nesterov: bool = False  # Nesterov momentum (needs momentum > 0)
    schedule: str = "cosine"  # constant | cosine | multistep (stepped once per epoch)
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1  # multistep: the lr is multiplied by this at each milestone

    def validate(self) -> list[str]:
        problems = field_problems("optim", self, {"lr": POSITIVE, "momentum": UNIT_HALF_OPEN,
                                                  "weight_decay": NON_NEGATIVE})
        if self.schedule not in ("constant", "cosine", "multistep"):
            problems.append(f"optim.schedule: expected constant, cosine or multistep, got '{self.schedule}'")
        if self.nesterov and self.momentum == 0:
            problems.append("optim.nesterov: needs momentum > 0")
        return problems


EVAL_NOISY = ("known", "all", "off")
# bf16 has fp32's exponent range; fp16 does not, so it runs with loss scales on the real step and on the meta
# passes (methods/engine/scaling.py).
PRECISIONS = ("fp32", "bf16", "fp16")
RENAMED = {"train.eval_noisy_train": "train.eval_noisy (known | all | off)"}


@dataclass
class TrainConfig:
    """The training loop: epochs, batch sizes, evaluation, checkpoints and step metrics."""

    epochs: int = 10  # passes over the noisy training set
    batch_size: int = 64  # global noisy batch per step, split evenly over workers
    clean_batch_size: int = 32  # global clean (meta) batch per step
    eval_batch_size: int = 512  # rows per forward pass when evaluating
    seed: int = 0  # seed of the model's initialisation, the batch order, clean-batch draws and augmentation
    # Mixed precision of every training step, the meta passes included (the look-ahead's JVP, the clean
    # gradient at w', the VJP through a meta-model): `bf16` autocasts matrix products and convolutions to
    # bfloat16, on CPU and GPU; `fp16` to float16, with dynamic loss scales on the real step and the meta passes
    # (a step that overflows is skipped and counted: `fp16_skipped_steps`, `fp16_skipped_meta_steps`), for GPUs
    # without bf16. Label tables, meta-gradient accumulators, weights and optimizer state stay fp32.
    precision: str = "fp32"
    # Per-epoch label recovery of the model (and a method's corrected labels) on the noisy set: `known` measures
    # it on the noisy rows whose true label is known (a fixed, seeded subset of at most `eval_noisy_max`);
    # `all` passes over every noisy row each epoch; `off` skips it. The exports (corrected labels, weights of
    # every noisy id) come from one full pass at the end unless `off`.
    eval_noisy: str = "known"
    eval_noisy_max: int = 50_000  # with `known`: at most this many rows, a fixed seeded subset
    # Steps between checkpoints inside an epoch (0: at epoch ends only). A run resumes from the latest one,
    # mid-epoch: the rest of that epoch trains on exactly the noisy ids it had not trained on yet.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # the latest checkpoints kept on disk (the best epoch's model is kept apart)
    # Steps between step metrics (loss, lr, samples/s, the method's own) in MLflow, at the global step; they
    # reach MLflow with the checkpoint that covers them (0: none).
    log_every: int = 50
    trace_ids_dir: str | None = None  # debugging: every rank appends the ids each step trains on (JSON lines)

    def validate(self) -> list[str]:
        return field_problems("train", self, {"epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE,
                                              "clean_batch_size": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE,
                                              "checkpoint_every": NON_NEGATIVE, "keep_checkpoints": AT_LEAST_ONE,
                                              "log_every": NON_NEGATIVE, "eval_noisy": one_of(EVAL_NOISY),
                                              "eval_noisy_max": AT_LEAST_ONE,
                                              "precision": one_of(PRECISIONS)})


@dataclass
class ResourcesConfig:
    """Workers and devices; the same experiment moves from a laptop to a GPU cluster by changing these."""

    num_workers: int = 2  # Ray Train workers; 0 runs the loop in the driver (debugging)
    use_gpu: bool = False  # one GPU per worker (or `gpus_per_worker`)
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (e.g. 0.5) packs several sweep trials on one GPU
    cpus_per_worker: float | None = None  # null: share the cluster's CPUs, leaving `data_cpus` to Ray Data
    data_cpus: float = 1.0  # CPUs left free for Ray Data's decode/augment tasks when sharing
    max_failures: int = 2  # worker-group restarts from the last checkpoint (-1: unlimited)

    def validate(self) -> list[str]:
        problems = field_problems("resources", self, {
            "num_workers": NON_NEGATIVE, "cpus_per_worker": POSITIVE.or_null("share the cluster's CPUs"),
            "gpus_per_worker": POSITIVE, "data_cpus": NON_NEGATIVE})
        if self.max_failures < -1:
            problems.append(f"resources.max_failures: must be >= -1 (-1 = unlimited), got {self.max_failures}")
        return problems


@dataclass
class TrackingConfig:
    """Where the run is recorded (MLflow) and where its checkpoints go."""

    uri: str | None = None  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db
    experiment: str = "metacorrect"  # MLflow experiment name
    run_name: str | None = None  # fixed name: a second run with it resumes from its last checkpoint
    storage_path: str = "runs"  # checkpoints and Ray Train state (shared storage on a cluster)
    log_model: bool = True  # log the final student's state dict as an artifact (model/model.pt)
    # A model registry name: the final student is logged as the run's MLflow model and registered as a new
    # version of it (with the run's metrics). None: nothing is registered.
    register_model: str | None = None
    # CPU, memory, disk, network and (where a GPU and nvidia-ml-py exist) GPU use of each worker node, as
    # MLflow system metrics, sampled every `system_metrics_interval_s` seconds.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # seconds between two samples of the system metrics

    def validate(self) -> list[str]:
        from metacorrect.checks import MODEL_NAME

        return field_problems("tracking", self, {"system_metrics_interval_s": POSITIVE,
                                                 "register_model": MODEL_NAME.or_null("nothing registered")})


@dataclass
class ExperimentConfig:
    """A whole experiment: one section per dataclass, read from YAML and `--set a.b=c` overrides."""

    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """Build and validate; raises ConfigError listing every problem."""
        problems: list[str] = []
        raw = dict(raw or {})
        method_raw = raw.pop("method", None) or {}
        if isinstance(method_raw, str):
            method_raw = {"name": method_raw}
        method = _build_method(method_raw, problems)
        cfg = _build(cls, raw, "", problems, skip={"method"})
        if cfg is not None:
            if method is not None:
                cfg.method = method
            problems.extend(cfg.problems())
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None,
                  method: str | Path | None = None) -> ExperimentConfig:
        """Read a YAML file (its `base:` files composed under it), apply `key=value` overrides, build and
        validate; raises ConfigError. `method` names a method file (e.g. configs/methods/mlc.yaml) whose method
        section replaces the config's."""
        raw = read_config_yaml(path)
        if method is not None:
            raw["method"] = read_method_yaml(method)
        return cls.from_dict(apply_overrides(raw, overrides or []))

    def with_overrides(self, overrides: list[str]) -> ExperimentConfig:
        """A new config with dotted `key=value` strings applied (a `method.name` switch first), validated."""
        # Switching method first drops the old method's own fields, which the new one would reject.
        names = [v for k, _, v in (o.partition("=") for o in overrides) if k.strip() == "method.name"]
        base = self.for_method(names[-1].strip()) if names else self
        return ExperimentConfig.from_dict(apply_overrides(base.to_dict(), overrides))

    def with_values(self, values: dict[str, Any]) -> ExperimentConfig:
        """The config with dotted fields set to typed values (e.g. a sweep trial's {"optim.lr": 0.01})."""
        base = self.for_method(values["method.name"]) if "method.name" in values else self
        raw = base.to_dict()
        for key, value in values.items():
            _set_dotted(raw, key, value, f"{key}={value!r}")
        return ExperimentConfig.from_dict(raw)

    def for_method(self, name: str) -> ExperimentConfig:
        """The same experiment under another method.

        The same method keeps its fields. Another method starts from its own defaults, except for the
        engine settings (`ENGINE_FIELDS`: look-ahead k, meta_grad) which mean the same for every meta
        method; a field such as `meta_lr` does not (MLC's Adam lr for the LCN is not EMLC's teacher SGD lr).
        """
        from metacorrect.methods import METHODS

        if name not in METHODS:
            raise ConfigError(f"method.name: unknown method '{name}' (expected one of {', '.join(sorted(METHODS))})")
        raw = self.to_dict()
        if name == self.method.name:
            return ExperimentConfig.from_dict(raw)
        known = {f.name for f in dataclasses.fields(METHODS[name].config_class)}
        raw["method"] = {k: v for k, v in raw["method"].items() if k in known and k in ENGINE_FIELDS} | {"name": name}
        return ExperimentConfig.from_dict(raw)

    # ---- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict of sections, as the YAML file holds them."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text, also written to `path` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and Tune search spaces."""
        return _flatten(self.to_dict())

    def problems(self) -> list[str]:
        """Every validation problem, one line each (empty when the config is valid)."""
        problems = []
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            problems.extend(section.validate() if hasattr(section, "validate") else [])
        problems.extend(self.data.prepare.validate())
        t, r = self.train, self.resources
        workers = max(1, r.num_workers)
        for name in ("batch_size", "clean_batch_size"):
            value = getattr(t, name)
            if value >= 1 and value % workers:
                problems.append(f"train.{name}: {value} is not divisible by resources.num_workers={workers}")
        return problems


# ---- helpers ------------------------------------------------------------------------------------
def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping at the top level; one-line ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def read_config_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a raw mapping. `base: FILE` (relative to the file) composes it over FILE: every section
    of the file replaces the base's field by field, and the method section replaces the base's as a whole (the
    fields of one method mean nothing to another). `method: FILE.yaml` (relative to the file) takes the method
    section of a method file (the form under configs/methods/)."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    if isinstance(raw.get("method"), str) and raw["method"].endswith((".yaml", ".yml")):
        raw["method"] = read_method_yaml(path.parent / raw["method"])
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: base: {base} includes itself")
    merged = read_config_yaml(base_path, (*_seen, path.resolve()))
    method = raw.pop("method", None)
    merged = _merge(merged, raw)
    if method is not None:
        merged["method"] = method
    return merged


def read_method_yaml(path: str | Path) -> dict[str, Any]:
    """The method section of a method file (`method: {name: ..., ...}`, the form under configs/methods/)."""
    raw = read_yaml_mapping(path, "method file")
    extra = sorted(set(raw) - {"method"})
    if extra or not isinstance(raw.get("method"), (dict, str)):
        raise ConfigError(f"{path}: a method file holds one section, method: (with at least name:)"
                          + (f"; found {', '.join(extra)}" if extra else ""))
    method = raw["method"]
    return {"name": method} if isinstance(method, str) else dict(method)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = _deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = _deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars/lists ("0.1", "true", "[1,2]")."""
    raw = _deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed, f"--set {key}")
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "method":
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = _deepcopy(value)


def _build_method(raw: dict[str, Any], problems: list[str]) -> MethodConfig | None:
    from metacorrect.methods import METHODS

    if not isinstance(raw, dict):
        problems.append("method: expected a section with at least 'name'")
        return None
    name = raw.get("name", "erm")
    if name not in METHODS:
        problems.append(f"method.name: unknown method '{name}' (expected one of {', '.join(sorted(METHODS))})")
        return None
    return _build(METHODS[name].config_class, raw, "method", problems)


def _build(cls: type, raw: Any, path: str, problems: list[str], skip: set[str] = frozenset()):
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'}: expected a section (mapping), got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        renamed = RENAMED.get(dotted) or (f"{path}.{cls.renamed[key]}" if key in getattr(cls, "renamed", {}) else None)
        if renamed:
            problems.append(f"{dotted}: renamed to {renamed}")
            continue
        if key not in names or key in skip:
            problems.append(f"{dotted}: unknown key (expected one of {', '.join(sorted(names - skip))})")
            continue
        ok, converted = _convert(hints[key], value, dotted, problems)
        if ok:
            kwargs[key] = converted
    return cls(**kwargs)


def _convert(tp: Any, value: Any, dotted: str, problems: list[str]) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        built = _build(tp, value, dotted, problems)
        return built is not None, built
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            ok, converted = _convert(arg, value, dotted, sub)
            if ok and not sub:
                return True, converted
        problems.append(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
        return False, None
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{dotted}: expected a list, got {value!r}")
            return False, None
        items = [_convert(item_tp, v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{dotted}: expected a mapping, got {value!r}")
            return False, None
        return True, dict(value)
    if tp is Any:
        return True, value
    if tp is bool:
        if isinstance(value, bool):
            return True, value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no decimal point) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return True, value
        if isinstance(value, bool):  # YAML 1.1 reads off/on (and no/yes) as booleans; a text field means the word
            return True, "on" if value else "off"
    problems.append(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
    return False, None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
