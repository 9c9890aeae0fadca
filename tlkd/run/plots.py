"""Plots written into run directories (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tlkd.run.rundir import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and top-1 accuracy per epoch, train and val."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    # a metric may be missing in some rows (None): e.g. no training at epoch 0, no val loss
    # for k-NN-scored pretraining
    for ax, key in ((ax_loss, "loss"), (ax_acc, "top1")):
        for split in ("train", "val"):
            rows = [r for r in history if r.get(f"{split}_{key}") is not None]
            ax.plot([r["epoch"] for r in rows], [r[f"{split}_{key}"] for r in rows], "o-",
                    label=split)  # fmt: skip
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    """Confusion matrix, rows = true class, columns = predicted class."""
    plt = _pyplot()
    n = len(classes)
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=90 if n > 10 else 45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    if n <= 20:
        peak = max(max(row) for row in matrix) or 1
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(
                    j,
                    i,
                    v,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v > peak / 2 else "black",
                )
    _save(fig, path)
    plt.close(fig)
