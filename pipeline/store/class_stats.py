"""Per-class statistics of an output, from its Parquet files: for each class, the images it was
found in, its labels, its share of all labelled pixels, score quantiles and mean area; so a class
never found, or found everywhere, shows at a glance.

Each shard's file is read for six leaf columns only (status, width, height and the labels'
class_id, score, area; never the masks), files in parallel threads (object stores are I/O bound),
and each shard is reduced to fixed-size counts (score histograms of ``BINS`` bins) that add up:
memory does not grow with the output, and quantiles are exact to 1 / BINS.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.layout import OutputLayout

BINS = 1000  # score histogram bins over [0, 1]: quantiles to 0.001
QUANTILES = (0.1, 0.5, 0.9)
LEAVES = ("status", "width", "height", "labels.list.element.class_id", "labels.list.element.score",
          "labels.list.element.area")


@dataclass
class ClassCounts:
    """Counts that add up over shards (``+``): per class images, labels, pixels, score histogram."""

    images: np.ndarray       # (K,) images with the class
    labels: np.ndarray       # (K,) labels of the class
    area: np.ndarray         # (K,) mask pixels, summed
    histogram: np.ndarray    # (K, BINS) finite scores
    unscored: np.ndarray     # (K,) labels with a NaN score
    pixels: int = 0          # pixels of all labelled (ok) images
    ok_images: int = 0

    @classmethod
    def zeros(cls, classes: int) -> "ClassCounts":
        z = np.zeros(classes, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros((classes, BINS), dtype=np.int64), z.copy())

    def __add__(self, other: "ClassCounts") -> "ClassCounts":
        return ClassCounts(self.images + other.images, self.labels + other.labels, self.area + other.area,
                           self.histogram + other.histogram, self.unscored + other.unscored,
                           self.pixels + other.pixels, self.ok_images + other.ok_images)


def shard_counts(layout: OutputLayout, shard_id: str, classes: int) -> ClassCounts:
    """One shard's counts, reading only ``LEAVES`` of its Parquet file."""
    fs, path = layout.labels_file(shard_id).fs_path
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        index = {parquet.schema.column(i).path: i for i in range(len(parquet.schema))}
        # leaf columns by index: ParquetFile.read selects whole top-level columns (all of labels)
        table = parquet.reader.read_all(column_indices=[index[leaf] for leaf in LEAVES])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    counts = ClassCounts.zeros(classes)
    counts.ok_images = table.num_rows
    counts.pixels = int(pc.sum(pc.multiply(table.column("width").cast("int64"),
                                           table.column("height").cast("int64"))).as_py() or 0)
    labels = table.column("labels")
    flat = pc.list_flatten(labels)
    if len(flat) == 0 or classes == 0:  # no labels, or an unreadable config (no vocabulary to count by)
        return counts
    image = pc.list_parent_indices(labels).to_numpy()
    class_id = pc.struct_field(flat, "class_id").to_numpy()
    score = pc.struct_field(flat, "score").to_numpy(zero_copy_only=False).astype(np.float64)
    area = pc.struct_field(flat, "area").to_numpy()
    counts.labels = np.bincount(class_id, minlength=classes)[:classes]
    counts.area = np.bincount(class_id, weights=area, minlength=classes)[:classes].astype(np.int64)
    pairs = np.unique(image.astype(np.int64) * classes + class_id)
    counts.images = np.bincount(pairs % classes, minlength=classes)[:classes]
    finite = np.isfinite(score)
    counts.unscored = np.bincount(class_id[~finite], minlength=classes)[:classes]
    bins = np.clip((score[finite] * BINS).astype(np.int64), 0, BINS - 1)
    counts.histogram = np.bincount(class_id[finite] * BINS + bins, minlength=classes * BINS)[:classes * BINS] \
        .reshape(classes, BINS)
    return counts


def count_classes(layout: OutputLayout, shard_ids: list[str], classes: int,
                  threads: int = 16) -> tuple[ClassCounts, dict[str, str]]:
    """All readable shards' counts, summed, and {shard_id: why not} for files that could not be
    read (damaged since their marker was written); files read ``threads`` at a time."""
    def one(shard_id: str):
        try:
            return shard_counts(layout, shard_id, classes)
        except Exception as err:  # any unreadable file: named, the others still counted
            return f"Parquet file unreadable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    total, unreadable = ClassCounts.zeros(classes), {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for shard_id, counts in zip(shard_ids, pool.map(one, shard_ids)):
            if isinstance(counts, str):
                unreadable[shard_id] = counts
            else:
                total = total + counts
    return total, unreadable


def _quantile(histogram: np.ndarray, q: float) -> Optional[float]:
    """The score below which a fraction ``q`` of the histogram's scores lie, to 1 / BINS."""
    total = int(histogram.sum())
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(histogram), q * total, side="left"))
    return round(min(index, BINS - 1) / BINS, 4)  # the bin's lower edge: the quantile lies within 1 / BINS above


def class_table(counts: ClassCounts, class_names: list[str]) -> list[dict]:
    """One row per class of the vocabulary, in vocabulary order (classes never found included)."""
    rows = []
    for k, name in enumerate(class_names):
        labels = int(counts.labels[k])
        rows.append({
            "class_id": k, "name": name, "images": int(counts.images[k]), "labels": labels,
            "image_share": round(int(counts.images[k]) / counts.ok_images, 4) if counts.ok_images else None,
            "pixel_share": round(int(counts.area[k]) / counts.pixels, 4) if counts.pixels else None,
            "mean_area": round(int(counts.area[k]) / labels, 1) if labels else None,
            "unscored": int(counts.unscored[k]),
            **{f"score_p{int(q * 100)}": _quantile(counts.histogram[k], q) for q in QUANTILES}})
    return rows


def format_class_table(rows: list[dict]) -> str:
    """A fixed-width table, most found class first; never-found classes last, named."""
    width = max([len("class"), *(len(r["name"]) for r in rows)])
    header = (f"{'class':<{width}}  {'images':>8} {'share':>6} {'labels':>8} {'pixels':>7} {'mean area':>10}  "
              f"{'score p10 / p50 / p90':>21}")
    lines = [header]

    def show(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)
    for r in sorted(rows, key=lambda r: (-r["images"], r["class_id"])):
        scores = " / ".join(show(r[f"score_p{int(q * 100)}"], ".3f") for q in QUANTILES)
        lines.append(f"{r['name']:<{width}}  {r['images']:>8} {show(r['image_share'], '.1%'):>6} {r['labels']:>8} "
                     f"{show(r['pixel_share'], '.2%'):>7} {show(r['mean_area'], '.0f'):>10}  {scores:>21}")
    never = [r["name"] for r in rows if not r["labels"]]
    if never:
        lines.append(f"never found: {', '.join(never)}")
    return "\n".join(lines)
