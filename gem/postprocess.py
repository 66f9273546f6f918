"""Dense class similarities -> label map, per-class masks, peak points and scores.

Work happens at the original image resolution, in bands of rows: the (C, h, w) patch
similarities are upsampled bilinearly one band at a time (the same values as a full
``F.interpolate(..., mode="bilinear")``), so a large photo with a large vocabulary never holds
a (C, H, W) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

BACKGROUND = -1


@dataclass(frozen=True)
class LabelingThresholds:
    """logit_scale multiplies cosine similarities before the softmax over classes; a pixel whose
    top class probability is below background_threshold is background; classes covering fewer
    than min_area pixels are dropped."""

    logit_scale: float = 100.0
    background_threshold: float = 0.0
    min_area: int = 1

    def __post_init__(self):
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}")
        if not 0.0 <= self.background_threshold <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {self.background_threshold}")
        if self.min_area < 1:
            raise ValueError(f"min_area must be >= 1, got {self.min_area}")


@dataclass
class ClassRegion:
    class_id: int
    score: float            # mean probability of the class over its mask
    peak_score: float       # probability at the point
    point: tuple[int, int]  # (x, y) of the peak, in original pixels
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    mask: np.ndarray        # bool (H, W)


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


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


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
    labels = np.empty((height, width), dtype=np.int16)
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
    regions = []
    for class_id in np.flatnonzero(counts >= thresholds.min_area):
        mask = labels == class_id
        y, x = divmod(int(peak_index[class_id]), width)
        regions.append(ClassRegion(int(class_id), float(prob_sums[class_id] / counts[class_id]),
                                   float(peak_prob[class_id]), (x, y), int(counts[class_id]), _bbox(mask), mask))
    return labels, regions
