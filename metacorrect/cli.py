"""`metacorrect` command line: run, compare, sweep, bench, submit, data prepare, data inspect."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from metacorrect.platform.quiet import VERBOSE_ENV  # light: Ray and MLflow are imported only where they run

EPILOG = """examples:
  metacorrect run configs/digits_demo.yaml
  metacorrect run configs/digits_demo.yaml --set method.name=clean_only --set train.epochs=5
  metacorrect run configs/base/digits.yaml --method configs/methods/emlc.yaml
  metacorrect compare configs/digits_demo.yaml --methods erm,clean_only
  metacorrect sweep configs/digits_mlc.yaml --num-samples 8 --save-best best.yaml
  metacorrect sweep configs/digits_mlc.yaml --num-samples 8 --resume      # continue an interrupted sweep
  metacorrect bench configs/suites/digits-quick.yaml           # every method, one protocol, one leaderboard
  metacorrect bench configs/suites/digits.yaml --resume        # continue an interrupted suite
  metacorrect bench configs/suites/digits.yaml --report        # re-print its leaderboard from MLflow
  metacorrect submit --address http://HEAD:8265 --follow -- run configs/digits_demo.yaml
  metacorrect data prepare digits --noise symmetric:0.6 --clean-per-class 10 --seed 0 --out data/digits-sym60
  metacorrect data inspect data/digits-sym60
"""

NOISE_HELP = ("label noise: none | symmetric:RATE[:uniform][:exact] | pair:RATE[:cifar10|cifar100|map=2>0;3>5]"
              "[:exact] | instance:RATE. symmetric flips to another class (uniform: may keep the class); "
              "default draws each label from T ('sampled'), :exact corrupts exactly round(RATE*n)")


# Shortcut flags of `data prepare` for the synthetic source's options: (flag, option, help).
SYNTHETIC_FLAGS = (("--n", "n", "number of images"), ("--classes", "num_classes", "number of classes"),
                   ("--image-size", "image_size", "side of the square images in pixels"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacorrect", description="Meta-learning for noisy labels on Ray, "
                                     "tracked in MLflow.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment YAML (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field by its dotted name, e.g. optim.lr=0.1 (repeatable)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--verbose", action="store_true",
                       help="also show Ray's and MLflow's own console notices (Ray's session logs always keep them)")

    p_run = sub.add_parser("run", help="train one method on Ray Train and track it in MLflow",
                           description="Train one method. A run with a fixed --name (tracking.run_name) "
                           "resumes from its last checkpoint when started again.")
    add_config_args(p_run)
    p_run.add_argument("--name", help="run name (same name = resume); default: unique per run")
    p_run.add_argument("--method", metavar="METHOD_FILE", help="a method file (e.g. configs/methods/emlc.yaml) "
                       "whose method section replaces the config's")

    p_bench = sub.add_parser(
        "bench", help="run a benchmark suite: every method x setting x seed under one protocol, one leaderboard",
        description="Run a benchmark suite (docs/benchmark-suites.md): one Ray Tune run whose trials are the "
        "suite's (method, setting, seed) runs, each (setting, seed) data set prepared once and shared, "
        "one MLflow parent run with the leaderboard (mean ± std over seeds), plots and one child run per trial. "
        "Each trial trains on resources.num_workers Ray Train workers, or in its own process with 0.")
    p_bench.add_argument("suite", help="suite YAML (see configs/suites/)")
    p_bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field of the base experiment (every trial), e.g. train.epochs=5")
    p_bench.add_argument("--resume", action="store_true", help="continue the suite: finished trials are kept, "
                         "interrupted ones resume from their last checkpoint")
    p_bench.add_argument("--report", action="store_true", help="print the leaderboard from MLflow; train nothing")
    p_bench.add_argument("--name", help="run name of the suite (default: the suite's name)")
    p_bench.add_argument("--max-concurrent", type=int, help="trials at a time (default: what the cluster fits)")
    p_bench.add_argument("--quiet", action="store_true", help="no progress output")
    p_bench.add_argument("--verbose", action="store_true", help="also show Ray's and MLflow's console notices")

    p_cmp = sub.add_parser("compare", help="run one config under several methods and print one table")
    add_config_args(p_cmp)
    p_cmp.add_argument("--methods", required=True, help="comma-separated method names, e.g. erm,clean_only")

    p_sweep = sub.add_parser(
        "sweep", help="search hyper-parameters with Ray Tune, each trial a Ray Train run",
        description="Search hyper-parameters with Ray Tune. Every trial is a full run of the platform (on "
        "resources.num_workers Ray Train workers, or, with --set resources.num_workers=0, in the trial's own "
        "process: cheaper for small models), tracked as a nested MLflow run under one parent run of the sweep "
        "(trials table and plots). "
        "Without --space, the method's default space is searched (--show-space prints it).",
        epilog=SPACE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p_sweep)
    p_sweep.add_argument("--space", help="search space YAML (default: the method's own space)")
    p_sweep.add_argument("--num-samples", type=int, default=8, help="trials to draw (times each grid entry; default 8)")
    p_sweep.add_argument("--scheduler", default="asha", choices=["asha", "fifo"],
                         help="asha stops weak trials early on the per-epoch metric (default); fifo runs all")
    p_sweep.add_argument("--search", default="random", choices=["random", "optuna"], help="search algorithm")
    p_sweep.add_argument("--metric", default="val_accuracy", help="validation metric to optimise (default "
                         "val_accuracy; val_loss is minimised)")
    p_sweep.add_argument("--max-concurrent", type=int, help="trials at a time (default: what the cluster fits)")
    p_sweep.add_argument("--name", help="sweep name (default: derived from config, space and options, so the "
                         "same command with --resume finds its sweep)")
    p_sweep.add_argument("--resume", action="store_true", help="continue the sweep of this name: finished trials "
                         "are kept, unfinished ones resume from their last checkpoint")
    p_sweep.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    p_sweep.add_argument("--save-best", metavar="PATH", help="write the best trial's config as YAML")
    p_sweep.add_argument("--show-space", action="store_true", help="print the space that would be searched and exit")

    p_sub = sub.add_parser(
        "submit", help="run a metacorrect command on a Ray cluster as a Ray job",
        description="Submit `python -m metacorrect COMMAND ...` to a Ray cluster (ray job submit).\n\n"
        "The project directory is the job's working_dir (without data/, runs/, mlruns/, .venv/, .git/), the job\n"
        "runs in the cluster's Python environment, and MLFLOW_TRACKING_URI (and --env) reach every process.\n"
        "The working_dir is a temporary copy that Ray deletes: give tracking.storage_path and data.path as\n"
        "shared absolute paths and use a tracking server (submit warns otherwise).\n"
        "A head with token authentication (Ray 2.60's default) gets the token from RAY_AUTH_TOKEN,\n"
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (plain `ray job submit` also needs RAY_AUTH_MODE=token).\n"
        "Exit status: the job's (0 = succeeded) with --follow, else 0 once submitted.",
        epilog="example:\n  metacorrect submit --address http://HEAD:8265 --env MLFLOW_TRACKING_URI=http://HEAD:5000 "
        "--follow -- sweep configs/digits_mlc.yaml --set tracking.storage_path=/shared/runs "
        "--set data.path=/shared/data/digits-sym60",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_sub.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default $RAY_ADDRESS)")
    p_sub.add_argument("--follow", action="store_true", help="stream the job's logs and wait for its end")
    p_sub.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="environment variable for the job (repeatable); MLFLOW_TRACKING_URI and AWS_* are "
                       "passed on from this shell when set")
    p_sub.add_argument("--pip", default="none", help="none (default: the cluster's Python environment as is), "
                       "project (Ray installs pyproject.toml's dependencies for the job, in a new virtualenv copied "
                       "from the cluster's Python: minutes for a large environment) or a requirements file")
    p_sub.add_argument("--working-dir", help="project directory to ship (default: the project around the cwd)")
    p_sub.add_argument("--exclude", action="append", default=[], help="more paths not to ship (gitignore syntax)")
    p_sub.add_argument("--job-id", help="submission id (default: generated)")
    p_sub.add_argument("--entrypoint-num-gpus", type=float, help="GPUs for the driver process itself")
    p_sub.add_argument("job", nargs=argparse.REMAINDER, help="-- then the metacorrect command, e.g. -- run CONFIG.yaml")

    p_data = sub.add_parser("data", help="prepare and inspect data sets")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p_prep = data_sub.add_parser("prepare", help="turn a source into the canonical parquet data set",
                                 description="Turn a source into the canonical parquet data set (docs/data.md, "
                                 "'The data contract'). The directory appears only when complete; image-folder "
                                 "sources are prepared on Ray and resume where a killed prepare stopped.")
    p_prep.add_argument("source", help="source name: digits, synthetic, cifar10, cifar100, cifar10n, clothing1m, "
                        "food101n (file sources need --option root=PATH; see docs/data.md, 'Sources')")
    p_prep.add_argument("--out", required=True, help="output directory (appears only when complete)")
    p_prep.add_argument("--noise", default=None, help=NOISE_HELP + " (default: none)")
    p_prep.add_argument("--clean-per-class", type=int, default=None, help="clean (meta) images per class (default: 10)")
    p_prep.add_argument("--val-per-class", type=int, default=None,
                        help="clean validation images per class (default: 20)")
    p_prep.add_argument("--preset", metavar="NAME:RATE",
                        help="a paper's CIFAR protocol, setting --noise, --clean-per-class, --val-per-class: "
                        "mlc-uniform, mlc-flip, emlc-sym, emlc-asym, ieg-10, ieg-1, mwnet-a (e.g. emlc-sym:0.8)")
    p_prep.add_argument("--test-fraction", type=float, default=0.2,
                        help="held-out test fraction for sources without a test split (default: 0.2)")
    p_prep.add_argument("--seed", type=int, default=0, help="seed of the splits and the noise (default: 0)")
    p_prep.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="source option, e.g. n=100000, image_size=64 for synthetic (repeatable)")
    for flag, option, what in SYNTHETIC_FLAGS:
        p_prep.add_argument(flag, type=int, dest=option, help=f"synthetic: {what} (= --option {option}=...)")
    p_prep.add_argument("--limit", type=int, help="use only the first N images of each pool / list (try a subset)")
    p_prep.add_argument("--workers", type=int,
                        help="parallel Ray tasks for image-folder sources and synthetic sets of >= 100,000 "
                        "images (default: one per CPU)")
    p_prep.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    p_prep.add_argument("--quiet", action="store_true")
    p_insp = data_sub.add_parser("inspect", help="counts per split, actual noise rate, transition matrix")
    p_insp.add_argument("directory")
    return parser


SPACE_HELP = """search space YAML: dotted config field -> one of
  optim.lr: {loguniform: [0.005, 0.2]}      method.k: {choice: [1, 2, 5, 10]}   (a bare list = choice)
  optim.momentum: {uniform: [0.8, 0.99]}     train.seed: {grid: [0, 1, 2]}       (every value)
  model.width: {randint: [16, 64]}           method.logit_scale: {lograndint: [1, 1000]} (ints, bounds included)
examples:
  metacorrect sweep configs/digits_mlc.yaml --show-space
  metacorrect sweep configs/digits_mlc.yaml --space space.yaml --num-samples 16 --save-best best.yaml
  metacorrect sweep configs/digits_mlc.yaml --num-samples 16 --resume
"""


def main(argv: list[str] | None = None) -> int:
    from metacorrect.config import ConfigError
    from metacorrect.datasets.contract import DataError
    from metacorrect.datasets.noise import NoiseSpecError

    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):  # read where Ray and MLflow are quieted, here and in Ray's processes
        os.environ[VERBOSE_ENV] = "1"
    try:
        return _dispatch(args)
    except (ConfigError, DataError, NoiseSpecError) as e:
        from metacorrect.errors import first_line, unwrapped

        # Raised in a Ray task (a damaged shard met while reading): its first line is the message.
        lines = [first_line(e)] if unwrapped(e) is not e else str(e).splitlines()
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (the run is closed KILLED in MLflow)
        from metacorrect.platform.torch_trainer import Terminated

        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        if args.data_command == "prepare":
            from metacorrect.datasets.prepare import prepare

            noise, clean, val = _split_args(args)
            prepare(args.source, args.out, noise=noise, clean_per_class=clean, val_per_class=val,
                    test_fraction=args.test_fraction, seed=args.seed, options=_source_options(args),
                    overwrite=args.overwrite, progress=not args.quiet, limit=args.limit, workers=args.workers)
            return 0
        from metacorrect.datasets.inspect import inspect_dataset

        print(inspect_dataset(args.directory))
        return 0

    if args.command == "submit":
        return _submit(args)
    if args.command == "bench":
        return _bench(args)
    from metacorrect.config import ExperimentConfig

    cfg = ExperimentConfig.from_yaml(args.config, args.overrides,  # validates before anything starts
                                     method=getattr(args, "method", None))
    if args.command == "sweep":
        return _sweep(args, cfg)
    if args.command == "run" and args.name:
        cfg.tracking.run_name = args.name
    from metacorrect.platform.results import format_table, where
    from metacorrect.platform.trainer import RunFailed, run

    try:
        if args.command == "run":
            results = [run(cfg, progress=not args.quiet)]
        else:
            names = [m.strip() for m in args.methods.split(",") if m.strip()]
            configs = [cfg.for_method(m) for m in names]  # all validated up front
            results = [run(c, progress=not args.quiet) for c in configs]
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(results))
    print()
    for r in results:
        print(f"{r.method}: run {r.run_name}, MLflow run id {r.mlflow_run_id}, checkpoint {r.checkpoint_path}")
    print(where(results[0].tracking_uri, results[0].mlflow_run_id))
    return 0


def _sweep(args: argparse.Namespace, cfg) -> int:
    from metacorrect.platform.trainer import RunFailed
    from metacorrect.tuning.space import load_space, space_to_yaml
    from metacorrect.tuning.sweep import sweep

    if args.show_space:
        print(space_to_yaml(load_space(args.space, cfg)), end="")
        return 0
    try:
        result = sweep(cfg, args.space, args.num_samples, scheduler=args.scheduler, search=args.search,
                       metric=args.metric, max_concurrent_trials=args.max_concurrent, name=args.name,
                       resume=args.resume, seed=args.seed, progress=not args.quiet)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(result)
    if args.save_best and result.best_config is not None:
        print(f"best config written to {result.save_best(args.save_best)}")
    return 0 if result.best_config is not None else 1


def _bench(args: argparse.Namespace) -> int:
    from metacorrect.platform.trainer import RunFailed
    from metacorrect.tuning.bench import bench, report

    if args.report:
        print(report(args.suite, args.overrides, name=args.name))
        return 0
    try:
        result = bench(args.suite, resume=args.resume, overrides=args.overrides,
                       max_concurrent_trials=args.max_concurrent, name=args.name, progress=not args.quiet)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(result)
    return 130 if result.interrupted else 1 if result.failed else 0  # 130: the shell's code for Ctrl-C


def _submit(args: argparse.Namespace) -> int:
    from metacorrect.config import ConfigError
    from metacorrect.platform.jobs import parse_env, submit

    command = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not command:
        raise ConfigError("submit: no command after --; e.g. metacorrect submit --address http://HEAD:8265 "
                          "-- run configs/digits_demo.yaml")
    result = submit(command, args.address, working_dir=args.working_dir, pip=args.pip, env=parse_env(args.env),
                    follow=args.follow, submission_id=args.job_id, entrypoint_num_gpus=args.entrypoint_num_gpus,
                    excludes=args.exclude)
    return result.exit_code


def _split_args(args: argparse.Namespace) -> tuple[str, int, int]:
    """--noise / --clean-per-class / --val-per-class, from a --preset or given one by one (not both)."""
    from metacorrect.config import ConfigError
    from metacorrect.datasets.presets import resolve_preset

    given = {"--noise": args.noise, "--clean-per-class": args.clean_per_class, "--val-per-class": args.val_per_class}
    if args.preset:
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ConfigError(f"--preset {args.preset} sets {', '.join(clash)}; give one or the other")
        p = resolve_preset(args.preset, args.source)
        return p.noise, p.clean_per_class, p.val_per_class
    return (args.noise or "none", 10 if args.clean_per_class is None else args.clean_per_class,
            20 if args.val_per_class is None else args.val_per_class)


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    """--option KEY=VALUE items, plus the synthetic shortcuts (--n, --classes, --image-size)."""
    from metacorrect.config import ConfigError

    out = _options(args.option)
    for flag, option, _ in SYNTHETIC_FLAGS:
        value = getattr(args, option)
        if value is None:
            continue
        if args.source != "synthetic":
            raise ConfigError(f"{flag}: only for the synthetic source (got source '{args.source}')")
        if option in out and out[option] != value:
            raise ConfigError(f"{flag} {value} contradicts --option {option}={out[option]}")
        out[option] = value
    return out


def _options(items: list[str]) -> dict[str, Any]:
    from metacorrect.config import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. n=100000")
        out[key.strip()] = yaml.safe_load(value)
    return out
