"""Dense class similarities -> label map, per-class masks, peak points and scores.

Work happens at the original image resolution, in bands of rows: the (C, h, w) patch
similarities are upsampled bilinearly one band at a time (the same values as a full
``F.interpolate(..., mode="bilinear")``), so a large photo with a large vocabulary never holds
a (C, H, W) tensor. Masks are never materialised either: each class's COCO RLE is cut straight
from the runs of the (column-major) label map, so memory stays at the label map plus its run
boundaries however many classes are present (``ClassRegion.mask`` decodes on demand).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from gem.settings import LabelingThresholds  # one definition, shared with the run's config

BACKGROUND = -1


@dataclass
class ClassRegion:
    class_id: int
    score: float            # mean probability of the class over its mask
    peak_score: float       # probability at the point
    point: tuple[int, int]  # (x, y) of the peak, in original pixels
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    rle: dict               # COCO compressed RLE: {'size': [H, W], 'counts': str}

    @property
    def mask(self) -> np.ndarray:
        """The bool (H, W) mask, decoded from the RLE on each access."""
        return mask_utils.decode({"size": self.rle["size"], "counts": self.rle["counts"].encode("ascii")}).astype(bool)


def upsampled_bands(x: torch.Tensor, size: tuple[int, int],
                    max_elements: int = 1 << 24) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, (C, rows, W) band) of ``F.interpolate(x[None], size, 'bilinear')[0]``."""
    channels, in_h, in_w = x.shape
    out_h, out_w = size
    rows_per_band = max(1, max_elements // max(1, channels * out_w))
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) * (2.0 / out_w) - 1.0
    source = x[None].float()
    for start in range(0, out_h, rows_per_band):
        stop = min(out_h, start + rows_per_band)
        ys = (torch.arange(start, stop, dtype=torch.float32) + 0.5) * (2.0 / out_h) - 1.0
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None].to(x.device)
        band = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        yield start, band[0]


class _Runs:
    """Maximal runs of equal values of a (H, W) label map in column-major (COCO RLE) order."""

    def __init__(self, labels_fortran: np.ndarray):
        self.height, self.width = labels_fortran.shape
        flat = labels_fortran.ravel(order="F")  # a view: the map is stored column-major
        self.total = flat.size
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        self.starts = np.concatenate(([0], change))
        self.ends = np.concatenate((change, [self.total]))
        self.values = flat[self.starts]
        order = np.argsort(self.values, kind="stable")  # runs grouped by class, in position order
        self._order = order
        classes, first = np.unique(self.values[order], return_index=True)
        self._slices = dict(zip(classes.tolist(), zip(first.tolist(), [*first[1:].tolist(), order.size])))

    def region_of(self, class_id: int) -> tuple[dict, tuple[int, int, int, int]]:
        """(COCO compressed RLE, bbox) of one class, from its runs alone."""
        begin, end = self._slices[class_id]
        index = self._order[begin:end]
        starts, ends = self.starts[index], self.ends[index]
        counts = np.empty(2 * starts.size + 1, dtype=np.int64)
        counts[0::2] = np.concatenate((starts, [self.total])) - np.concatenate(([0], ends))  # zeros
        counts[1::2] = ends - starts  # ones
        if counts[-1] == 0:
            counts = counts[:-1]
        rle = mask_utils.frPyObjects({"size": [self.height, self.width], "counts": counts.tolist()},
                                     self.height, self.width)
        h = self.height
        first_col, last_col = starts // h, (ends - 1) // h
        one_column = first_col == last_col
        top = int(np.where(one_column, starts % h, 0).min())
        bottom = int(np.where(one_column, (ends - 1) % h, h - 1).max())
        left, right = int(first_col[0]), int(last_col[-1])
        return ({"size": [self.height, self.width], "counts": rle["counts"].decode("ascii")},
                (left, top, right - left + 1, bottom - top + 1))


def _softmax_top_bands(similarities: torch.Tensor, size: tuple[int, int], thresholds: LabelingThresholds
                       ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start, band in upsampled_bands(similarities * thresholds.logit_scale, size):
        top_prob, top_class = torch.softmax(band, dim=0).max(dim=0)
        top_prob, top_class = top_prob.cpu().numpy(), top_class.cpu().numpy()
        top_class[top_prob < thresholds.background_threshold] = BACKGROUND
        yield start, top_prob, top_class


def label_image(similarities: Optional[torch.Tensor], size: tuple[int, int],
                thresholds: LabelingThresholds = LabelingThresholds(),
                top_bands: Optional[Iterable[tuple[int, np.ndarray, np.ndarray]]] = None,
                num_classes: Optional[int] = None) -> tuple[np.ndarray, list[ClassRegion]]:
    """(C, h, w) cosine similarities -> (H, W) int16 label map (-1 background) and one region per
    present class, ordered by class id.

    top_bands: instead of the similarities, (first row, top probability, class or -1) bands from
    another decision (``gem.dense``: synonyms, background names, PAMR), with ``num_classes``."""
    num_classes = num_classes if num_classes is not None else similarities.shape[0]
    height, width = size
    labels = np.empty((height, width), dtype=np.int16, order="F")  # column-major, as COCO RLE runs
    counts = np.zeros(num_classes, dtype=np.int64)
    prob_sums = np.zeros(num_classes, dtype=np.float64)
    peak_prob = np.full(num_classes, -1.0)
    peak_index = np.zeros(num_classes, dtype=np.int64)
    if top_bands is None:
        top_bands = _softmax_top_bands(similarities, size, thresholds)
    for start, top_prob, top_class in top_bands:
        labels[start:start + top_class.shape[0]] = top_class
        fg = top_class.reshape(-1) >= 0
        classes, probs = top_class.reshape(-1)[fg], top_prob.reshape(-1)[fg]
        flat_index = np.flatnonzero(fg) + start * width
        counts += np.bincount(classes, minlength=num_classes)
        prob_sums += np.bincount(classes, weights=probs, minlength=num_classes)
        order = np.argsort(-probs, kind="stable")
        present, first = np.unique(classes[order], return_index=True)
        band_peak, band_index = probs[order[first]], flat_index[order[first]]
        better = band_peak > peak_prob[present]
        peak_prob[present[better]] = band_peak[better]
        peak_index[present[better]] = band_index[better]
    stats = ClassStats(counts, prob_sums, peak_prob, peak_index)
    return labels, list(class_regions(labels, stats, thresholds.min_area))


@dataclass
class ClassStats:
    """Per class, over the foreground pixels it wins: pixel count, sum of its probabilities, and
    its peak probability with the peak's flat (row-major) pixel index."""

    counts: np.ndarray
    prob_sums: np.ndarray
    peak_prob: np.ndarray
    peak_index: np.ndarray


def class_regions(labels: np.ndarray, stats: ClassStats, min_area: int = 1) -> Iterator[ClassRegion]:
    """One region per class with at least ``min_area`` pixels, in class order, each with its RLE
    cut from the label map's runs: no per-class mask is ever built, so memory does not grow with
    the number of classes present."""
    width = labels.shape[1]
    present = np.flatnonzero(stats.counts >= min_area)
    if not present.size:
        return
    runs = _Runs(np.asfortranarray(labels))
    for class_id in present:
        rle, bbox = runs.region_of(int(class_id))
        y, x = divmod(int(stats.peak_index[class_id]), width)
        yield ClassRegion(int(class_id), float(stats.prob_sums[class_id] / stats.counts[class_id]),
                          float(stats.peak_prob[class_id]), (x, y), int(stats.counts[class_id]), bbox, rle)
