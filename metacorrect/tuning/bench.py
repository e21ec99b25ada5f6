"""`bench()`: a benchmark suite, every (method, setting, seed) one trial of one Ray Tune run, under one protocol.

A suite file names a base experiment (data source, model, optimizer, the one training budget every method
gets), the settings (noise specs and clean-set sizes), the methods (method files or inline fields, with
explicit per-method overrides) and the seeds. Every (setting, seed) data set is prepared once, before Ray
starts, and every method trains on it: the noise realisation is frozen and its digest is a tag of each run.

Layout under the base's `tracking.storage_path`:

    <suite name>/                    Tune's experiment directory (state for --resume), mlflow_run.json (parent),
                                     plan.json (the trials, checked on --resume)
    <suite name>/trial_runs/<method>-<setting>-seed<s>/   each trial's Ray Train run, its MLflow child run id,
                                     predictions.parquet (the per-sample export)
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacorrect.config import ConfigError, ExperimentConfig, PrepareConfig, read_config_yaml, read_method_yaml
from metacorrect.config import read_yaml_mapping
from metacorrect.tuning.trial import (TRIAL_RESULT_FILE, _check_params, build_trial_trainer,
                                      describe_trial_resources, trial_resources, write_trial_result)

SUITE_KEYS = ("name", "description", "base", "overrides", "settings", "methods", "seeds", "data_root",
              "max_concurrent_trials")
SETTING_KEYS = tuple(f for f in PrepareConfig.__dataclass_fields__ if f not in ("seed", "source")) + ("preset", "label")
ENTRY_KEYS = ("file", "label", "overrides")  # the other keys of a method entry are method fields
TRIAL_RUNS = "trial_runs"
PLAN_FILE = "plan.json"
EXPORT_FILE = "predictions.parquet"


@dataclass
class MethodEntry:
    label: str  # the leaderboard's row
    method: dict[str, Any]  # the method section
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted non-method fields, shown on the leaderboard
    source: str = ""  # the method file, if any


@dataclass
class Setting:
    label: str  # the leaderboard's column
    prepare: dict[str, Any]  # data.prepare fields (noise, clean_per_class, ...)

    @property
    def noise_rate(self) -> float:
        from metacorrect.datasets.noise import parse_noise

        return parse_noise(self.prepare["noise"]).rate


@dataclass
class TrialSpec:
    key: str  # also the trial's run name
    method: str  # the entry's label
    setting: str
    seed: int
    config: ExperimentConfig


@dataclass
class Suite:
    name: str
    path: str  # the suite file ("" for a suite given as a dict)
    base: ExperimentConfig  # the base experiment (no method section of its own)
    settings: list[Setting]
    methods: list[MethodEntry]
    seeds: list[int]
    data_root: Path
    max_concurrent_trials: int | None = None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def trials(self) -> list[TrialSpec]:
        """Every (method, setting, seed), its full config (validated when the suite was loaded). Seed-major:
        trials start in this order, so a suite stopped part-way has whole seeds (every method on every setting),
        which the leaderboard can compare, rather than a few methods on every seed."""
        return [TrialSpec(trial_key(m.label, s.label, seed), m.label, s.label, seed, self.trial_config(m, s, seed))
                for seed in self.seeds for s in self.settings for m in self.methods]

    def trial_config(self, entry: MethodEntry, setting: Setting, seed: int) -> ExperimentConfig:
        raw = self.base.to_dict()
        raw["method"] = dict(entry.method)
        raw["data"]["prepare"] |= dict(setting.prepare) | {"seed": seed}
        raw["data"]["path"] = None
        raw["train"]["seed"] = seed
        raw["tracking"]["run_name"] = None
        cfg = ExperimentConfig.from_dict(raw)
        cfg = cfg.with_values({"data.path": str(self.data_root / data_dir_name(cfg.data.prepare))})
        return cfg.with_values(entry.overrides) if entry.overrides else cfg

    def data_config(self, setting: Setting, seed: int):
        return self.trial_config(MethodEntry("", {"name": "erm"}), setting, seed).data


def data_dir_name(prepare: PrepareConfig) -> str:
    """The directory of one (setting, seed) data set: readable, and distinct for every distinct `data.prepare`
    (so a data set prepared for other arguments is never reused)."""
    import dataclasses
    import hashlib

    from metacorrect.config import DataConfig

    key = hashlib.sha1(json.dumps(dataclasses.asdict(prepare), sort_keys=True).encode()).hexdigest()[:8]
    return f"{DataConfig(prepare=prepare).resolved_path().name}-{key}"


def trial_key(method: str, setting: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{method}-{setting}-seed{seed}").strip("-")


# ---- loading and validating a suite (no Ray) ----------------------------------------------------------------
def load_suite(suite: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Suite:
    """Read and validate a suite: every problem is one line naming the file and field, raised as ConfigError
    before anything starts. `overrides` (`a.b=c`) apply to the base, so to every trial."""
    if isinstance(suite, dict):
        raw, where, folder = dict(suite), "suite", Path.cwd()
    else:
        raw, where, folder = read_yaml_mapping(suite, "suite file"), str(suite), Path(suite).resolve().parent
    problems: list[str] = []
    for key in raw:
        if key not in SUITE_KEYS:
            problems.append(f"{where}: {key}: unknown key (expected one of {', '.join(SUITE_KEYS)})")
    base_overrides = raw.get("overrides") or {}
    if not isinstance(base_overrides, dict):
        problems.append(f"{where}: overrides: expected a mapping of dotted fields of the base, e.g. "
                        f"{{train.epochs: 10}}, got {base_overrides!r}")
        base_overrides = {}
    sets = [f"{k}={json.dumps(v)}" for k, v in base_overrides.items()] + list(overrides or [])
    base = _load_base(raw.get("base"), folder, where, sets, problems)
    settings = _load_settings(raw.get("settings"), base.data.prepare.source, where, problems)
    methods = _load_methods(raw.get("methods"), folder, where, problems)
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        problems.append(f"{where}: seeds: expected a non-empty list of integers, e.g. [0, 1, 2], got {seeds!r}")
        seeds = []
    elif not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        problems.append(f"{where}: seeds: expected non-negative integers, got {seeds!r}")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"{where}: seeds: {seeds!r} repeats a seed")
    concurrent = raw.get("max_concurrent_trials")
    if concurrent is not None and (not isinstance(concurrent, int) or concurrent < 1):
        problems.append(f"{where}: max_concurrent_trials: expected an integer >= 1 or null, got {concurrent!r}")
    name = raw.get("name") or (Path(suite).stem if not isinstance(suite, dict) else None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problems.append(f"{where}: name: expected a name of letters, digits, '-', '_' or '.', got {name!r}")
    if problems:
        raise ConfigError(problems)
    data_root = Path(raw.get("data_root") or "data")
    data_root = (data_root if data_root.is_absolute() else Path.cwd() / data_root).resolve()
    out = Suite(name=name, path="" if isinstance(suite, dict) else str(suite), base=base, settings=settings,
                methods=methods, seeds=list(seeds), data_root=data_root, max_concurrent_trials=concurrent,
                description=str(raw.get("description") or ""), raw=raw)
    for i, entry in enumerate(methods):  # every trial's config is valid (a method's overrides included)
        for setting in settings:
            try:
                out.trial_config(entry, setting, seeds[0])
            except ConfigError as e:
                problems += [f"{where}: methods[{i}] ({entry.label}): {p}" for p in e.problems]
                break
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return out


def _load_base(base: Any, folder: Path, where: str, overrides: list[str], problems: list[str]) -> ExperimentConfig:
    from metacorrect.config import apply_overrides

    try:
        if isinstance(base, str):
            raw = read_config_yaml(folder / base)
        elif isinstance(base, dict):
            raw = dict(base)
        else:
            problems.append(f"{where}: base: expected the path of a config file (relative to the suite) or an "
                            f"inline experiment, got {base!r}")
            return ExperimentConfig()
        raw.pop("method", None)  # the suite's methods set it
        cfg = ExperimentConfig.from_dict(apply_overrides(raw, overrides))
    except ConfigError as e:
        problems += [f"{where}: base: {p}" for p in e.problems]
        return ExperimentConfig()
    if cfg.data.path:
        problems.append(f"{where}: base: data.path is set; a suite prepares one data set per setting and seed from "
                        f"data.prepare (put them elsewhere with data_root)")
    return cfg


def _load_settings(settings: Any, source: str, where: str, problems: list[str]) -> list[Setting]:
    if not isinstance(settings, list) or not settings:
        problems.append(f"{where}: settings: expected a non-empty list of noise settings, e.g. "
                        f"[{{noise: 'symmetric:0.6', clean_per_class: 10}}], got {settings!r}")
        return []
    out = []
    for i, item in enumerate(settings):
        item = {"noise": item} if isinstance(item, str) else item
        if isinstance(item, dict) and "preset" in item:  # a paper's protocol (noise, clean and val sizes)
            from metacorrect.datasets.contract import DataError
            from metacorrect.datasets.presets import resolve_preset

            try:
                p = resolve_preset(str(item["preset"]), source)
            except DataError as e:
                problems.append(f"{where}: settings[{i}].preset: {e}")
                continue
            item = {"noise": p.noise, "clean_per_class": p.clean_per_class, "val_per_class": p.val_per_class,
                    "label": str(item["preset"]).replace(":", "-")} | {k: v for k, v in item.items() if k != "preset"}
        if not isinstance(item, dict) or "noise" not in item:
            problems.append(f"{where}: settings[{i}]: expected a noise spec or a mapping with noise: (or preset:), "
                            f"got {item!r}")
            continue
        unknown = [k for k in item if k not in SETTING_KEYS]
        for k in unknown:
            problems.append(f"{where}: settings[{i}].{k}: unknown key (expected one of {', '.join(SETTING_KEYS)})")
        prepare = {k: v for k, v in item.items() if k != "label" and k not in unknown}
        try:
            PrepareConfig(**prepare)
            sub = ExperimentConfig.from_dict({"data": {"prepare": prepare}})
        except (ConfigError, TypeError) as e:
            for p in getattr(e, "problems", [str(e)]):
                problems.append(f"{where}: settings[{i}]: {p}")
            continue
        label = item.get("label") or _setting_label(sub.data.prepare, item)
        out.append(Setting(str(label), prepare))
    labels = [s.label for s in out]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"{where}: settings: two settings are labelled '{label}' (give each a distinct label:)")
    return out


def _setting_label(prepare: PrepareConfig, given: dict[str, Any]) -> str:
    from metacorrect.datasets.noise import parse_noise

    spec = parse_noise(prepare.noise)
    label = "none" if spec.is_none else f"{spec.kind}{round(spec.rate * 100):d}"
    if "clean_per_class" in given:
        label += f"-c{prepare.clean_per_class}"
    return label


def _load_methods(methods: Any, folder: Path, where: str, problems: list[str]) -> list[MethodEntry]:
    if not isinstance(methods, list) or not methods:
        problems.append(f"{where}: methods: expected a non-empty list of method files, names or sections, "
                        f"got {methods!r}")
        return []
    out = []
    for i, item in enumerate(methods):
        at = f"{where}: methods[{i}]"
        if isinstance(item, str):
            item = {"file": item} if item.endswith((".yaml", ".yml")) else {"name": item}
        if not isinstance(item, dict):
            problems.append(f"{at}: expected a method file, a method name or a mapping, got {item!r}")
            continue
        method: dict[str, Any] = {}
        source = item.get("file")
        if source is not None:
            try:
                method = read_method_yaml(folder / source)
            except ConfigError as e:
                problems += [f"{at}.file: {p}" for p in e.problems]
                continue
        fields = {k: v for k, v in item.items() if k not in ENTRY_KEYS}
        if fields.get("name") not in (None, method.get("name")) and method:
            problems.append(f"{at}.name: '{fields['name']}' contradicts the method file's '{method.get('name')}'")
            continue
        method = method | fields
        if "name" not in method:
            problems.append(f"{at}: names no method (give name: or file:)")
            continue
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            problems.append(f"{at}.overrides: expected a mapping of dotted fields, e.g. {{train.epochs: 30}}, "
                            f"got {overrides!r}")
            continue
        bad = [k for k in overrides if str(k).startswith("method.") or str(k) in ("method", "data.path")
               or str(k).endswith(".seed")]
        for k in bad:
            problems.append(f"{at}.overrides.{k}: not overridable per method (method fields go in the entry "
                            f"itself; seeds and data come from the suite)")
        # Every trial of a suite has one Tune reservation and one plan of trials at a time, from the base.
        for k in (k for k in overrides if str(k).startswith("resources.")):
            problems.append(f"{at}.overrides.{k}: not overridable per method (every trial runs on the base's "
                            f"resources; set it in the suite's overrides or with --set)")
        label = str(item.get("label") or method["name"])
        sub: list[str] = []
        try:
            ExperimentConfig.from_dict({"method": method})
        except ConfigError as e:
            sub = e.problems
        for p in sub:  # a field of the entry is named by its place in the suite, a field of a file by the file
            if source and not any(p.startswith(f"method.{k}:") for k in fields):
                problems.append(f"{at} ({source}): {p}")
            else:
                problems.append(f"{at}.{p.removeprefix('method.')}" if p.startswith("method.") else f"{at}: {p}")
        if sub or bad:
            continue
        out.append(MethodEntry(label, method, dict(overrides), str(source or "")))
    labels = [m.label for m in out]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"{where}: methods: two entries are labelled '{label}' (give each a distinct label:)")
    return out


# ---- running a suite -------------------------------------------------------------------------------------------
@dataclass
class BenchContext:
    """What the driver resolved for every trial (absolute paths and URIs), keyed by trial key."""

    trials: dict[str, dict[str, Any]]  # key -> {config, data_dir, tags}
    tracking_uri: str
    parent_run_id: str
    bench_name: str
    trial_storage: str
    resources: dict[str, float]  # Tune's reservation for each trial's own process (`trial.trial_resources`)


@dataclass
class BenchResult:
    name: str
    path: str
    parent_run_id: str
    tracking_uri: str
    leaderboard: Any  # metacorrect.tuning.leaderboard.Leaderboard
    failed: list[str] = field(default_factory=list)  # trial keys that failed
    wall_s: float = 0.0  # this call's
    interrupted: bool = False  # stopped (Ctrl-C) before every trial ended: `--resume` continues it
    ran: int | None = None  # trials this call finished (None: all of them, or a report)
    total_wall_s: float | None = None  # over every call that ran the suite (the parent's `wall_s`)

    def __str__(self) -> str:
        from metacorrect.platform.results import where

        failed = f"\nFAILED trials (not in the tables): {', '.join(self.failed)}" if self.failed else ""
        stopped = (f"\nINTERRUPTED: {len(self.leaderboard.trials)} of {self.leaderboard.num_trials} trials finished; "
                   f"--resume continues the suite") if self.interrupted else ""
        timing = f"trials in {self.wall_s / 60:.1f} min"
        if self.ran is not None and self.ran < self.leaderboard.num_trials:  # a resumed suite
            timing = (f"trials, {self.ran} of them in this run's {self.wall_s / 60:.1f} min "
                      f"({(self.total_wall_s or self.wall_s) / 60:.1f} min over all its runs)")
        return (f"{self.leaderboard.to_markdown()}{failed}{stopped}\nsuite {self.name}: {self.leaderboard.num_trials} "
                f"{timing}, MLflow parent run {self.parent_run_id}\n{where(self.tracking_uri)}")


def bench(suite: str | Path | dict[str, Any], resume: bool = False, overrides: list[str] | None = None,
          max_concurrent_trials: int | None = None, name: str | None = None, progress: bool = True) -> BenchResult:
    """Run a suite: one Ray Tune run (grid, FIFO), every (method, setting, seed) one trial that is a full Ray
    Train run, tracked as a child of one MLflow parent run that gets the leaderboard, plots and trials table.
    `resume=True` continues the suite of the same name: finished trials are not re-run, interrupted ones
    resume from their last checkpoint, and no MLflow run is created twice."""
    from metacorrect.platform import interrupts, tracking
    from metacorrect.platform.trainer import ensure_ray, ensure_trainable_dataset

    started = time.time()
    spec = load_suite(suite, overrides)
    name = name or spec.name
    trials = spec.trials()
    storage = Path(spec.base.tracking.storage_path).expanduser().resolve()
    bench_dir = storage / name
    plan = {t.key: {"method": t.method, "setting": t.setting, "seed": t.seed} for t in trials}
    if (bench_dir / "mlflow_run.json").is_file():
        if not resume:
            raise ConfigError(f"suite '{name}' already exists at {bench_dir}: add --resume (resume=True) to continue "
                              f"it, --report to print its leaderboard, or --name (name=) for a new run of it")
        stored = json.loads((bench_dir / PLAN_FILE).read_text()) if (bench_dir / PLAN_FILE).is_file() else plan
        if stored != plan:
            raise ConfigError(f"suite '{name}': its methods, settings or seeds changed since it started at "
                              f"{bench_dir}; resume it unchanged or give it a new --name")

    data_dirs: dict[tuple[str, int], Path] = {}
    for setting in spec.settings:  # once per (setting, seed), shared by every method
        for seed in spec.seeds:
            data_dirs[(setting.label, seed)], _ = ensure_trainable_dataset(spec.data_config(setting, seed), progress)
    ensure_ray()
    uri = tracking.resolve_tracking_uri(spec.base.tracking.uri)
    concurrency, per_worker = _plan_concurrency(spec, max_concurrent_trials, len(trials), bench_dir, resume)

    parent_id, resumed = tracking.start_run(uri, spec.base.tracking.experiment, name, bench_dir,
                                            tags={"bench": name, "bench.role": "parent"})
    if not resumed:
        (bench_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1))
        _log_parent_start(uri, parent_id, spec)
    contexts = _trial_contexts(trials, data_dirs, per_worker, name, parent_id)
    trial_base = spec.base.with_values({"resources.cpus_per_worker": per_worker})
    context = BenchContext(trials=contexts, tracking_uri=uri, parent_run_id=parent_id, bench_name=name,
                           trial_storage=str(bench_dir / TRIAL_RUNS), resources=trial_resources(trial_base))
    if progress:
        print(f"[bench] {'resuming' if resumed else 'starting'} suite {name}: {len(spec.methods)} method(s) x "
              f"{len(spec.settings)} setting(s) x {len(spec.seeds)} seed(s) = {len(trials)} trials, "
              f"{spec.base.train.epochs} epochs each; up to {concurrency} at a time, each "
              f"{describe_trial_resources(trial_base)}", flush=True)
    from metacorrect.tuning.leaderboard import log_leaderboard, read_leaderboard

    def finished() -> int:
        return sum((bench_dir / TRIAL_RUNS / t.key / TRIAL_RESULT_FILE).is_file() for t in trials)

    finished_before = finished()
    wall_before = tracking.client(uri).get_run(parent_id).data.metrics.get("wall_s", 0.0) if resumed else 0.0
    with tracking.parent_closed_on_failure(uri, parent_id):
        with interrupts.handlers_kept():  # Tune leaves its Ctrl-C handler behind
            grid = _tuner(context, trials, concurrency, bench_dir, resume, progress).fit()
        failed = sorted(r.config.get("trial") for r in grid if r.error)
        # Ctrl-C: Tune stops and returns with trials neither finished nor failed; --resume continues them.
        interrupted = grid.num_terminated + grid.num_errors < len(trials)
        tracking.end_open_children(uri, parent_id, "KILLED" if interrupted else "FAILED")  # trials that died open
        board = read_leaderboard(uri, parent_id)
        result = BenchResult(name=name, path=str(bench_dir), parent_run_id=parent_id, tracking_uri=uri,
                             leaderboard=board, failed=failed, wall_s=time.time() - started, interrupted=interrupted,
                             ran=finished() - finished_before, total_wall_s=wall_before + time.time() - started)
        log_leaderboard(uri, parent_id, board)
        c = tracking.client(uri)
        c.log_metric(parent_id, "trials", len(trials))
        c.log_metric(parent_id, "failed_trials", len(failed))
        c.log_metric(parent_id, "wall_s", result.total_wall_s)  # the suite's time, summed over its runs
    tracking.end_run(uri, parent_id, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    return result


def report(suite: str | Path | dict[str, Any], overrides: list[str] | None = None,
           name: str | None = None) -> BenchResult:
    """The leaderboard of a suite that ran (or is running), read back from MLflow; nothing is trained."""
    from metacorrect.platform import tracking
    from metacorrect.tuning.leaderboard import read_leaderboard

    spec = load_suite(suite, overrides)
    name = name or spec.name
    marker = Path(spec.base.tracking.storage_path).expanduser().resolve() / name / "mlflow_run.json"
    if not marker.is_file():
        raise ConfigError(f"suite '{name}': no run of it under {marker.parent.parent} (run it first)")
    info = json.loads(marker.read_text())
    uri = info["tracking_uri"]
    board = read_leaderboard(uri, info["run_id"])
    run = tracking.client(uri).get_run(info["run_id"])
    wall_s = run.data.metrics.get("wall_s", math.nan)
    return BenchResult(name=name, path=str(marker.parent), parent_run_id=info["run_id"], tracking_uri=uri,
                       leaderboard=board, wall_s=wall_s, total_wall_s=wall_s)


def _plan_concurrency(spec: Suite, requested: int | None, num_trials: int, bench_dir: Path,
                      resume: bool) -> tuple[int, float]:
    """(trials at a time, CPUs per worker), as a sweep plans them (the trials that run together fit the cluster
    and leave `resources.data_cpus` to Ray Data), and as the suite's first start planned them when resuming."""
    from metacorrect.tuning.sweep import SweepOptions, kept_trial_plan

    options = SweepOptions(max_concurrent_trials=requested or spec.max_concurrent_trials)
    concurrency, cfg = kept_trial_plan(spec.base, options, num_trials, bench_dir, resume)
    return concurrency, cfg.resources.cpus_per_worker


def _trial_contexts(trials: list[TrialSpec], data_dirs: dict[tuple[str, int], Path], per_worker: float,
                    name: str, parent_id: str) -> dict[str, dict[str, Any]]:
    from metacorrect.datasets.labels import label_digest

    digests = {key: label_digest(path) for key, path in data_dirs.items()}
    out = {}
    for t in trials:
        data_dir = data_dirs[(t.setting, t.seed)]
        cfg = t.config.with_values({"resources.cpus_per_worker": per_worker, "data.path": str(data_dir)})
        out[t.key] = {"config": cfg.to_dict(), "data_dir": str(data_dir),
                      "tags": {"mlflow.parentRunId": parent_id, "bench": name, "bench.method": t.method,
                               "bench.setting": t.setting, "bench.seed": str(t.seed),
                               "bench.label_digest": digests[(t.setting, t.seed)]}}
    return out


def _tuner(context: BenchContext, trials: list[TrialSpec], concurrency: int, bench_dir: Path, resume: bool,
           progress: bool):
    from ray import tune

    from metacorrect.tuning.leaderboard import make_progress

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables would interleave with our lines
    from metacorrect.platform import quiet

    if not quiet.verbose():  # "The `on_step_begin` operation took 0.6 s": the driver's own pace on a busy machine
        import logging

        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    trainable = tune.with_resources(tune.with_parameters(run_bench_trial, context=context), context.resources)
    if resume and tune.Tuner.can_restore(str(bench_dir)):
        return tune.Tuner.restore(str(bench_dir), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space={"trial": tune.grid_search([t.key for t in trials])},
        tune_config=tune.TuneConfig(num_samples=1, scheduler=tune.schedulers.FIFOScheduler(),
                                    search_alg=tune.search.BasicVariantGenerator(max_concurrent=concurrency),
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=bench_dir.name, storage_path=str(bench_dir.parent), verbose=0,
                                  callbacks=[make_progress(len(trials), enabled=progress)]),
    )


def _trial_name(trial) -> str:
    return f"tune-{trial.config.get('trial', trial.trial_id)}"


def run_bench_trial(params: dict[str, Any], context: BenchContext) -> None:
    """The Tune function trainable: the platform's run of one (method, setting, seed), epochs reported to Tune.
    Its run is named after the trial key, so a resumed trial continues its own checkpoint and MLflow run, and a
    trial that had finished replays its recorded history instead of training again."""
    from ray import tune

    from metacorrect.datasets.contract import read_meta
    from metacorrect.platform import quiet, trainer

    quiet.quiet_this_process()
    key = params["trial"]
    spec = context.trials[key]
    cfg = ExperimentConfig.from_dict(spec["config"])
    storage = Path(context.trial_storage)
    run_dir = storage / key
    _check_params(run_dir, params)
    finished = run_dir / TRIAL_RESULT_FILE
    if finished.is_file():
        for row in json.loads(finished.read_text())["history"]:
            tune.report(row)
        return

    started = time.time()
    data_dir = Path(spec["data_dir"])
    meta = read_meta(data_dir)
    run_id, _ = trainer.open_tracked_run(context.tracking_uri, cfg, meta, data_dir, key, run_dir,
                                         tags=spec["tags"] | {"trial_id": tune.get_context().get_trial_id()})
    run = build_trial_trainer(cfg, data_dir, meta, name=key, storage=storage, uri=context.tracking_uri,
                              run_id=run_id)
    result = trainer.fit_tracked(run, context.tracking_uri, run_id, key, run_dir, close_on_failure=False)
    if result.checkpoint is not None:
        from metacorrect.platform import tracking
        from metacorrect.tuning.export import export_predictions

        with result.checkpoint.as_directory() as ckpt_dir:
            path = export_predictions(cfg, ckpt_dir, data_dir, run_dir / EXPORT_FILE)
        tracking.client(context.tracking_uri).log_artifact(run_id, str(path), "exports")
    out = trainer.finish_run(cfg, result.checkpoint, name=key, uri=context.tracking_uri, run_id=run_id,
                             run_dir=run_dir, data_dir=data_dir, started=started)
    write_trial_result(run_dir, out.history, out.checkpoint_path)


def _log_parent_start(uri: str, run_id: str, spec: Suite) -> None:
    import yaml

    from metacorrect.platform import tracking
    from metacorrect.tuning.leaderboard import plan_tag

    b = spec.base
    tracking.log_params(uri, run_id, {
        "bench.methods": [m.label for m in spec.methods], "bench.settings": [s.label for s in spec.settings],
        "bench.seeds": spec.seeds, "train.epochs": b.train.epochs, "model.arch": b.model.arch,
        "model.width": b.model.width, "train.batch_size": b.train.batch_size, "optim.lr": b.optim.lr,
        "data.prepare.source": b.data.prepare.source, "data.root": str(spec.data_root)})
    c = tracking.client(uri)
    c.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "suite.yaml")
    c.log_text(run_id, b.to_yaml(), "base_config.yaml")
    c.set_tag(run_id, "bench.plan", plan_tag(spec))
    if spec.description:
        c.set_tag(run_id, "mlflow.note.content", spec.description)
