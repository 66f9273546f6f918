"""Pictures of label quality (matplotlib, no display needed): per-class IoU, confusion, the
calibration grid."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_class_iou(names: Sequence[str], iou: Sequence[float], mean_iou: float, path: Path) -> Path:
    """Horizontal bars, worst class at the top; classes without pixels anywhere are left out."""
    plt = _pyplot()
    pairs = sorted(((v, n) for n, v in zip(names, iou) if not math.isnan(v)), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(pairs), 3) + 1.2))
    values = [100 * v for v, _ in pairs]
    bars = ax.barh(range(len(pairs)), values, color=plt.cm.viridis(np.array(values) / 100))
    ax.set_yticks(range(len(pairs)), [n for _, n in pairs])
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.axvline(100 * mean_iou, color="crimson", linestyle="--", label=f"mIoU {100 * mean_iou:.1f}")
    ax.set_xlim(0, 112)
    ax.set_xlabel("IoU (%)")
    ax.set_title("Per-class IoU")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion: np.ndarray, names: Sequence[str], classes: Sequence[int], path: Path) -> Path:
    """Rows: ground truth; columns: prediction (+ "no class"); each row normalised to 1."""
    plt = _pyplot()
    fig = confusion_figure(confusion, names, classes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_figure(confusion: np.ndarray, names: Sequence[str], classes: Sequence[int]):
    """The confusion figure, laid out: its title on two lines, so that it fits over a plot of
    few classes (one line was cut off at both sides)."""
    plt = _pyplot()
    columns = list(classes) + [confusion.shape[1] - 1]
    matrix = confusion[np.ix_(list(classes), columns)].astype(np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    labels = [names[c] for c in classes]
    size = 0.45 * len(columns) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), labels + ["(no class)"], rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if len(columns) <= 25:
        for (i, j), value in np.ndenumerate(share):
            if value >= 0.005:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion\n(share of each ground-truth class's pixels)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_grid(miou: np.ndarray, logit_scales: Sequence[float], background_thresholds: Sequence[float],
              min_areas: Sequence[int], best: tuple[int, int, int], path: Path) -> Path:
    """mIoU over the grid: one panel per min_area, logit scale x background threshold; best boxed."""
    plt = _pyplot()
    panels = len(min_areas)
    fig, axes = plt.subplots(1, panels, figsize=(0.7 * len(background_thresholds) * panels + 2.5 * panels,
                                                 0.45 * len(logit_scales) + 2.4), squeeze=False,
                             layout="constrained")
    finite = miou[~np.isnan(miou)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for k, ax in enumerate(axes[0]):
        image = ax.imshow(100 * miou[:, :, k], cmap="magma", vmin=100 * low, vmax=100 * max(high, low + 1e-9),
                          aspect="auto")
        ax.set_xticks(range(len(background_thresholds)), [f"{t:g}" for t in background_thresholds])
        ax.set_yticks(range(len(logit_scales)), [f"{s:g}" for s in logit_scales])
        ax.set_xlabel("background threshold")
        if k == 0:
            ax.set_ylabel("logit scale")
        ax.set_title(f"min_area {min_areas[k]}")
        for (i, j), value in np.ndenumerate(miou[:, :, k]):
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if value > (low + high) / 2 else "white")
        if best[2] == k:
            ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="lime", lw=2.5))
    fig.colorbar(image, ax=axes[0].tolist(), label="mIoU (%)", fraction=0.03)
    fig.suptitle("Calibration: mIoU over the post-processing grid (best boxed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
