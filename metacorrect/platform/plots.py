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
