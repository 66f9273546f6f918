"""Dense class similarities -> label map, per-class masks, peak points and scores.

Work happens at the original image resolution, in bands of rows: the (C, h, w) patch
similarities are upsampled bilinearly one band at a time (the same values as a full
``F.interpolate(..., mode="bilinear")``), so a large photo with a large vocabulary never holds
a (C, H, W) tensor. Everything up to the label map and each class's count, probability sum, peak
and box runs on the similarities' device (``RegionStats``); the CPU gets the int16 label map
and cuts the RLE. Masks are never materialised either: each class's COCO RLE is cut straight
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

    def rle_of(self, class_id: int) -> dict:
        """One class's COCO compressed RLE, from its runs alone."""
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
        return {"size": [self.height, self.width], "counts": rle["counts"].decode("ascii")}


def softmax_top_bands(similarities: torch.Tensor, size: tuple[int, int], thresholds: LabelingThresholds
                      ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row, top probability, top class or BACKGROUND) per band of the upsampled softmax."""
    for start, band in upsampled_bands(similarities * thresholds.logit_scale, size):
        top_prob, top_class = torch.softmax(band, dim=0).max(dim=0)
        top_class[top_prob < thresholds.background_threshold] = BACKGROUND
        yield start, top_prob, top_class


@dataclass
class ClassStats:
    """Per class, over the foreground pixels it wins: pixel count, sum of its probabilities, its
    peak probability with the peak's flat (row-major) pixel index, and its box (x, y, w, h).
    ``pixel_prob``: each pixel's winning probability (float16, (H, W)), which ``label_map`` keeps
    so that each connected component (instance) of a class can be scored by its own mean."""

    counts: np.ndarray
    prob_sums: np.ndarray
    peak_prob: np.ndarray
    peak_index: np.ndarray
    boxes: np.ndarray
    pixel_prob: Optional[np.ndarray] = None


class RegionStats:
    """``ClassStats`` accumulated band by band on the bands' own device (the model's GPU in a GPU
    worker), so only the label map itself comes back to the CPU, for RLE.

    Background pixels go to one extra bin rather than being filtered out: boolean indexing would
    wait for the device. The probability sums are float64: for images up to a few megapixels
    (sums < 2^22, probabilities >= 2^-6, float32 each) they are exact, so the order in which a
    device adds them does not change the scores."""

    CHUNK_PIXELS = 1 << 20  # pixels whose per-pixel index buffers exist at once (see ``add``)
    NAN_RANK = -0.5  # a NaN probability's rank: under every probability, over "no pixel yet" (-1)

    def __init__(self, num_classes: int, width: int, device: torch.device):
        self.num_classes, self.width = num_classes, width
        bins, big = num_classes + 1, torch.iinfo(torch.int64).max
        self.counts = torch.zeros(bins, dtype=torch.int64, device=device)
        self.prob_sums = torch.zeros(bins, dtype=torch.float64, device=device)
        self.peak_prob = torch.full((bins,), -1.0, device=device)
        self.peak_index = torch.zeros(bins, dtype=torch.int64, device=device)
        self.low = torch.full((2, bins), big, dtype=torch.int64, device=device)    # first row, first column
        self.high = torch.full((2, bins), -1, dtype=torch.int64, device=device)    # last row, last column

    def add(self, start: int, top_prob: torch.Tensor, top_class: torch.Tensor) -> None:
        """One band: rows ``start...`` of the top probability and class (or BACKGROUND), taken
        ``CHUNK_PIXELS`` at a time so the per-pixel index buffers (~64 bytes a pixel) stay small
        whatever the band's size."""
        rows = max(1, self.CHUNK_PIXELS // self.width)
        for offset in range(0, top_class.shape[0], rows):
            self._add_rows(start + offset, top_prob[offset:offset + rows], top_class[offset:offset + rows])

    def _add_rows(self, start: int, top_prob: torch.Tensor, top_class: torch.Tensor) -> None:
        classes = top_class.reshape(-1).long()
        bins = torch.where(classes >= 0, classes, self.num_classes)
        probs = top_prob.reshape(-1).float()
        self.counts += torch.bincount(bins, minlength=self.num_classes + 1)
        self.prob_sums.index_add_(0, bins, probs.double())
        flat = torch.arange(bins.numel(), device=bins.device) + start * self.width
        # the peak: the highest probability, the first pixel in raster order among equals; a NaN
        # probability (an overflowing model) ranks below every real one, so it is a class's peak
        # only when the class has no other (its point still in its mask; its peak score NaN)
        ranked = torch.where(probs.isnan(), self.NAN_RANK, probs)
        band_peak = torch.full_like(self.peak_prob, -1.0).scatter_reduce_(0, bins, ranked, "amax")
        at_peak = torch.where(ranked == band_peak[bins], flat, torch.iinfo(torch.int64).max)
        band_index = torch.full_like(self.peak_index, torch.iinfo(torch.int64).max).scatter_reduce_(
            0, bins, at_peak, "amin")
        better = band_peak > self.peak_prob  # earlier rows keep their peak on a tie
        self.peak_prob = torch.where(better, band_peak, self.peak_prob)
        self.peak_index = torch.where(better, band_index, self.peak_index)
        position = torch.stack((flat // self.width, flat % self.width))
        index = bins.expand(2, -1)
        self.low.scatter_reduce_(1, index, position, "amin")
        self.high.scatter_reduce_(1, index, position, "amax")

    def result(self) -> ClassStats:
        """The classes' statistics on the CPU (background's bin dropped)."""
        kept = slice(0, self.num_classes)
        low, high = self.low[:, kept].cpu().numpy(), self.high[:, kept].cpu().numpy()
        boxes = np.stack((low[1], low[0], high[1] - low[1] + 1, high[0] - low[0] + 1), axis=1)
        peak_prob = self.peak_prob[kept].double()
        peak_prob = torch.where(peak_prob == self.NAN_RANK, float("nan"), peak_prob)
        return ClassStats(self.counts[kept].cpu().numpy(), self.prob_sums[kept].cpu().numpy(),
                          peak_prob.cpu().numpy(), self.peak_index[kept].cpu().numpy(), boxes)


def label_map(similarities: Optional[torch.Tensor], size: tuple[int, int],
              thresholds: LabelingThresholds = LabelingThresholds(),
              top_bands: Optional[Iterable[tuple[int, torch.Tensor, torch.Tensor]]] = None,
              num_classes: Optional[int] = None) -> tuple[np.ndarray, ClassStats]:
    """(C, h, w) cosine similarities -> (H, W) int16 label map (-1 background) on the CPU and each
    class's statistics. Probabilities, the label map, counts, peaks and boxes are computed on the
    similarities' device; the label map is copied to the CPU, for the RLE (``class_regions``).

    top_bands: instead of the similarities, (first row, top probability, class or -1) bands from
    another decision (``gem.dense``: synonyms, background names, PAMR), with ``num_classes``."""
    num_classes = num_classes if num_classes is not None else similarities.shape[0]
    height, width = size
    labels = np.empty((height, width), dtype=np.int16, order="F")  # column-major, as COCO RLE runs
    pixel_prob = np.empty((height, width), dtype=np.float16)  # half the label map's size again
    if top_bands is None:
        top_bands = softmax_top_bands(similarities, size, thresholds)
    stats: Optional[RegionStats] = None
    for start, top_prob, top_class in top_bands:
        top_prob, top_class = torch.as_tensor(top_prob), torch.as_tensor(top_class)
        stats = stats or RegionStats(num_classes, width, top_class.device)
        stats.add(start, top_prob, top_class)
        labels[start:start + top_class.shape[0]] = top_class.to(torch.int16).cpu().numpy()
        pixel_prob[start:start + top_class.shape[0]] = top_prob.to(torch.float16).cpu().numpy()
    if stats is None:  # an image without rows
        stats = RegionStats(num_classes, width, torch.device("cpu"))
    result = stats.result()
    result.pixel_prob = pixel_prob
    return labels, result


def label_image(similarities: Optional[torch.Tensor], size: tuple[int, int],
                thresholds: LabelingThresholds = LabelingThresholds(),
                top_bands: Optional[Iterable[tuple[int, torch.Tensor, torch.Tensor]]] = None,
                num_classes: Optional[int] = None) -> tuple[np.ndarray, list[ClassRegion]]:
    """``label_map``, then one region per present class (at least ``thresholds.min_area``
    pixels), ordered by class id."""
    labels, stats = label_map(similarities, size, thresholds, top_bands, num_classes)
    return labels, list(class_regions(labels, stats, thresholds.min_area))


def class_regions(labels: np.ndarray, stats: ClassStats, min_area: int = 1) -> Iterator[ClassRegion]:
    """One region per class with at least ``min_area`` pixels, in class order, each with its RLE
    cut from the label map's runs (the one per-region step on the CPU): no per-class mask is ever
    built, so memory does not grow with the number of classes present."""
    width = labels.shape[1]
    present = np.flatnonzero(stats.counts >= min_area)
    if not present.size:
        return
    runs = _Runs(np.asfortranarray(labels))
    for class_id in present:
        y, x = divmod(int(stats.peak_index[class_id]), width)
        yield ClassRegion(int(class_id), float(stats.prob_sums[class_id] / stats.counts[class_id]),
                          float(stats.peak_prob[class_id]), (x, y), int(stats.counts[class_id]),
                          tuple(int(v) for v in stats.boxes[class_id]), runs.rle_of(int(class_id)))
