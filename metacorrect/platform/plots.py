"""Figures logged to MLflow: transition-matrix heat maps and learning curves (matplotlib, no display)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def transition_heatmap(matrix: np.ndarray, class_names: Sequence[str], title: str,
                       xlabel: str = "noisy label", ylabel: str = "true label"):
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    c = m.shape[0]
    size = min(12.0, 2.0 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 20:
        ax.set_xticks(range(c), [str(n) for n in class_names], rotation=90)
        ax.set_yticks(range(c), [str(n) for n in class_names])
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def learning_curves(history: list[dict[str, float]], title: str):
    """Accuracy-type metrics per epoch in one panel, losses in another."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("val_accuracy", "test_accuracy", "ema_test_accuracy", "noisy_recovery", "noisy_recovery_corrupted",
                "noisy_memorised_corrupted"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            acc_ax.plot(epochs, values, marker="o", label=key)
    for key in ("train_loss", "val_loss", "test_loss"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, values, marker="o", label=key)
    acc_ax.set_ylim(0, 1)
    for ax, name in ((acc_ax, "accuracy / fraction"), (loss_ax, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_vs_param(values: list, metrics: list[float], param: str, metric: str, log_x: bool = False,
                    labels: list[str] | None = None):
    """One point per sweep trial: its best `metric` against the value of one searched `param`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        xs = values
    else:  # categorical values: one tick per distinct value, in first-seen order
        categories = list(dict.fromkeys(str(v) for v in values))
        xs = [categories.index(str(v)) for v in values]
        ax.set_xticks(range(len(categories)), categories)
    ax.scatter(xs, metrics, s=40)
    for x, y, label in zip(xs, metrics, labels or []):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if log_x and numeric:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"{metric} vs {param}")
    fig.tight_layout()
    return fig


def trial_curves(curves: dict[str, tuple[list[float], list[float]]], metric: str, title: str):
    """Every trial's per-epoch `metric` in one panel (label -> (epochs, values))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (epochs, values) in curves.items():
        ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(curves) <= 20:
        ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def weight_histogram(weight: np.ndarray, corrupted: np.ndarray, title: str, bins: int = 40):
    """Per-sample weights of the clean and of the corrupted noisy samples, overlaid (densities)."""
    plt = _pyplot()
    weight = np.asarray(weight, dtype=float)
    corrupted = np.asarray(corrupted, dtype=bool)
    hi = float(np.quantile(weight, 0.995)) if len(weight) else 1.0
    edges = np.linspace(0.0, max(hi, 1e-6), bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mask, label, colour in ((~corrupted, "clean label", "tab:blue"), (corrupted, "corrupted label", "tab:red")):
        if mask.any():
            ax.hist(np.clip(weight[mask], 0.0, edges[-1]), bins=edges, alpha=0.55, density=True, color=colour,
                    label=f"{label} (n={int(mask.sum())}, mean {weight[mask].mean():.3g})")
    ax.set_xlabel("weight (values above the 99.5% quantile in the last bin)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
