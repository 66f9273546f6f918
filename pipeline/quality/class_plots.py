"""Pictures of what an output found, for ``gemlabel report --plots DIR`` (matplotlib, no display):
how many images each class is in (a class never found shows as an empty bar, named), and each
found class's score histogram (small multiples, one scale), written as PNGs to a local folder or
an object store."""
from __future__ import annotations

import io
import math

import numpy as np

from pipeline.io.storage import Location
from pipeline.quality.plots import _pyplot
from pipeline.store.class_stats import BINS, ClassCounts

SHOWN_BINS = 50      # histogram bars per panel (of the BINS counted)
MAX_PANELS = 48      # score panels: the most-found classes


def _save(fig, file: Location) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    file.write_bytes_atomic(buffer.getvalue())
    return file.url


def plot_class_presence(counts: ClassCounts, names: list[str], file: Location) -> str:
    """Horizontal bars: images containing each class, most found at the top, all classes shown."""
    plt = _pyplot()
    order = sorted(range(len(names)), key=lambda k: (-int(counts.images[k]), k))
    values = [int(counts.images[k]) for k in order]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(names), 3) + 1.2))
    colors = ["lightgray" if v == 0 else "tab:blue" for v in values]
    bars = ax.barh(range(len(order)), values, color=colors)
    ax.set_yticks(range(len(order)), [names[k] + ("  (never found)" if v == 0 else "") for k, v in zip(order, values)])
    ax.invert_yaxis()
    ax.bar_label(bars, padding=2, fontsize=8)
    if counts.ok_images:
        ax.axvline(counts.ok_images, color="crimson", linestyle="--", label=f"all {counts.ok_images} images")
        ax.legend(loc="lower right")
    ax.set_xlim(0, max(counts.ok_images, max(values, default=0), 1) * 1.12)
    ax.set_xlabel("images containing the class")
    ax.set_title("Classes found")
    fig.tight_layout()
    return _save(fig, file)


def plot_score_histograms(counts: ClassCounts, names: list[str], file: Location) -> str:
    """One panel per found class (the MAX_PANELS most found): its labels' score histogram."""
    plt = _pyplot()
    found = sorted((k for k in range(len(names)) if counts.labels[k]), key=lambda k: (-int(counts.labels[k]), k))
    shown = found[:MAX_PANELS]
    cols = max(1, min(6, math.ceil(math.sqrt(len(shown)))))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows + 0.6), sharex=True, squeeze=False)
    edges = np.linspace(0, 1, SHOWN_BINS + 1)
    for ax, k in zip(axes.flat, shown):
        coarse = counts.histogram[k].reshape(SHOWN_BINS, BINS // SHOWN_BINS).sum(axis=1)
        ax.bar(edges[:-1], coarse, width=1 / SHOWN_BINS, align="edge", color="tab:blue")
        ax.set_title(f"{names[k]} ({int(counts.labels[k])})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no labels", ha="center", va="center")
    left_out = len(found) - len(shown)
    fig.suptitle("Label scores per class" + (f" ({left_out} less-found classes not shown)" if left_out else ""))
    fig.supxlabel("score (mean class probability over the mask)", fontsize=9)
    fig.tight_layout()
    return _save(fig, file)


def write_class_plots(counts: ClassCounts, names: list[str], folder: Location) -> list[str]:
    return [plot_class_presence(counts, names, folder.child("classes.png")),
            plot_score_histograms(counts, names, folder.child("scores.png"))]
