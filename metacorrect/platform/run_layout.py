"""How a run reads in the MLflow UI: its name, the tags a researcher filters by, its one-line description, which
of its values are charts (metrics) and which are bookkeeping (tags), and its source commit.

Only the driver calls these (the workers log metric rows through `tracking.log_rows`, which splits bookkeeping
values off with `is_bookkeeping`).
"""
from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metacorrect.config import ExperimentConfig
from metacorrect.datasets.contract import DatasetMeta

# Values of an epoch row that are counters, indices and timings: logged as tags (the latest value) instead of
# charts. `<model>_best_epoch` (e.g. IEG's `ema_best_epoch`) too. The rest (accuracies, losses, recovery, meta
# statistics, lr, throughput) stay metrics, charted per epoch.
BOOKKEEPING = ("epoch", "best_epoch", "epoch_time_s", "steps", "noisy_rows_seen", "wall_s")
NOTE_TAG = "mlflow.note.content"  # the run's (or experiment's) Description panel
SIGNIFICANT_DIGITS = 6  # metric values as MLflow stores them: readable, and well below evaluation noise

SHORT_NOISE = {"symmetric": "sym", "pair": "pair", "instance": "inst"}


def is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING or key.endswith("_best_epoch")


def tag_value(value: Any) -> str:
    """A bookkeeping number as a tag: integers without a decimal point, timings to 4 significant digits."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def metric_value(value: float) -> float:
    """Rounded to `SIGNIFICANT_DIGITS` (the UI shows stored values as they are: 0.7549234135667396)."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def noise_parts(meta: DatasetMeta) -> tuple[str, float]:
    """(noise type, nominal rate) of the data set's noise model; ("none", 0.0) for clean labels and real noise."""
    from metacorrect.datasets.noise import NoiseSpecError, parse_noise

    try:
        spec = parse_noise(meta.noise)
    except NoiseSpecError:
        return meta.noise, 0.0
    return spec.kind, spec.rate


def short_noise(meta: DatasetMeta) -> str:
    """`sym60`, `pair40`, `inst20`; `clean` for none."""
    kind, rate = noise_parts(meta)
    if kind == "none":
        return "clean"
    return f"{SHORT_NOISE.get(kind, kind)}{rate * 100:g}"


def run_name(cfg: ExperimentConfig, meta: DatasetMeta, taken: Callable[[str], bool] = lambda name: False) -> str:
    """`mlc-digits-sym60-s0-7f3a`: method, data source, noise, seed and a 4-hex suffix, drawn again while `taken`
    (a run directory of that name would be resumed)."""
    stem = f"{cfg.method.name}-{_slug(meta.source)}-{short_noise(meta)}-s{cfg.train.seed}"
    while True:
        name = f"{stem}-{uuid.uuid4().hex[:4]}"
        if not taken(name):
            return name


def trial_name(params: dict[str, Any], trial_id: str) -> str:
    """A sweep child run's name: its searched values, then the trial's number (`lr=0.0674 seed=1 #2`). A field
    is named by its last part unless two searched fields share it."""
    last = [k.rsplit(".", 1)[-1] for k in params]
    parts = [f"{short if last.count(short) == 1 else key}={_short_value(value)}"
             for key, short, value in zip(params, last, params.values())]
    number = trial_id.rsplit("_", 1)[-1].lstrip("0") or "0"
    return " ".join(parts + [f"#{number}"])


def run_tags(cfg: ExperimentConfig, meta: DatasetMeta) -> dict[str, str]:
    """The tags every run (and sweep parent) carries: what a researcher filters and groups by, its source
    commit when run from a git checkout, and the description."""
    kind, rate = noise_parts(meta)
    tags = {"method": cfg.method.name, "dataset": meta.name, "source": meta.source, "noise": meta.noise,
            "noise_type": kind, "noise_rate": f"{rate:g}",
            "clean_size": str(meta.counts.get("clean_train", 0)), "seed": str(cfg.train.seed),
            NOTE_TAG: description(cfg, meta)}
    if meta.prepare_args.get("clean_per_class") is not None:
        tags["clean_per_class"] = str(meta.prepare_args["clean_per_class"])
    tags |= source_tags()
    return tags


def description(cfg: ExperimentConfig, meta: DatasetMeta) -> str:
    """One line: method, data, noise, clean set, seed, model, optimisation and workers."""
    kind, _ = noise_parts(meta)
    noise = "no synthetic noise" if kind == "none" else f"{meta.noise} noise"
    if meta.actual_noise_rate is not None and kind != "none":
        noise += f" (actual {meta.actual_noise_rate:.3f})"
    t, o, r = cfg.train, cfg.optim, cfg.resources
    return (f"{cfg.method.name} on {meta.name}: {noise}, {meta.counts.get('clean_train', 0)} clean, "
            f"{meta.counts.get('noisy_train', 0)} noisy; seed {t.seed}; {cfg.model.arch} width {cfg.model.width}; "
            f"{t.epochs} epochs, batch {t.batch_size}+{t.clean_batch_size} clean, lr {o.lr:g} {o.schedule}; "
            + (f"{r.num_workers} worker(s){' on GPU' if r.use_gpu else ''}" if r.num_workers else "in the driver"))


def source_tags() -> dict[str, str]:
    """MLflow's source tags (the run page's Source panel) and `git_commit` / `git_dirty` when metacorrect runs
    from a git checkout; just the source name otherwise (an installed package, a cluster job)."""
    root = Path(__file__).resolve().parents[2]
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "metacorrect"}
    if not (root / ".git").exists():
        return tags
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return tags
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    tags |= {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit,
             "mlflow.source.name": str(root)}
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    return tags


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "data"
