"""Segmentation scores computed as mmseg's IoUMetric computes them, plus point hits.

mmseg (mmseg/evaluation/metrics/iou_metric.py) accumulates, over the whole dataset, per class:
intersection, union, predicted area and ground-truth area over the pixels whose ground truth is
not the ignore index; then IoU = intersect / union, Acc = intersect / gt area, aAcc = sum of
intersections / sum of gt areas, and mIoU / mAcc = nanmean over classes, so a class absent from
both prediction and ground truth (0/0 = NaN) is not counted. Predictions outside [0, C) (here:
pixels no class was given to) fall outside its histograms: they count in the ground truth's area
and so in the union, never in an intersection. All four areas are the sums of one confusion
matrix (ground truth rows, prediction columns, one extra column for "no class"), which is what is
accumulated here; the confusion matrix is also what the plots show.

fwIoU (frequency-weighted IoU) = sum over classes of (class's share of ground-truth pixels) x IoU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

IGNORE_INDEX = 255


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0/0 -> NaN (as torch's division gives mmseg)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator.astype(np.float64) / denominator.astype(np.float64)


@dataclass
class SegmentationScores:
    """The summary of an accumulation; per-class arrays are indexed by class."""

    iou: np.ndarray
    acc: np.ndarray
    area_intersect: np.ndarray
    area_union: np.ndarray
    area_pred: np.ndarray
    area_label: np.ndarray
    aAcc: float
    mIoU: float
    mAcc: float
    fwIoU: float
    point_hits: np.ndarray
    point_total: np.ndarray
    point_precision: np.ndarray  # per class: hits / points (NaN without points)
    point_precision_overall: float


class SegmentationMetric:
    """Accumulates a confusion matrix and point hits over images; ``scores()`` summarises them."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if not 0 < num_classes < ignore_index:
            raise ValueError(f"num_classes must be in [1, {ignore_index}), got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # rows: ground truth class; columns: predicted class, the last one "no class"
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.point_hits = np.zeros(num_classes, dtype=np.int64)
        self.point_total = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """pred: (H, W) ints, class ids in [0, C), anything else = no class; label: (H, W) ground
        truth, class ids in [0, C) or the ignore index."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {label.shape} differ in size")
        valid = label != self.ignore_index
        gt = label[valid].astype(np.int64)
        if gt.size and gt.max() >= self.num_classes:
            raise ValueError(f"ground truth holds class {int(gt.max())}, beyond the {self.num_classes} classes")
        predicted = pred[valid].astype(np.int64)
        predicted = np.where((predicted >= 0) & (predicted < self.num_classes), predicted, self.num_classes)
        width = self.num_classes + 1
        self.confusion += np.bincount(gt * width + predicted, minlength=self.num_classes * width).reshape(
            self.num_classes, width)

    def update_points(self, points: Iterable[tuple[int, int, int]], label: np.ndarray) -> None:
        """points: (x, y, class id); a point on an ignored pixel is not counted."""
        for x, y, class_id in points:
            truth = int(label[y, x])
            if truth == self.ignore_index or not 0 <= class_id < self.num_classes:
                continue
            self.point_total[class_id] += 1
            self.point_hits[class_id] += int(truth == class_id)

    def merge(self, other: "SegmentationMetric") -> None:
        self.confusion += other.confusion
        self.point_hits += other.point_hits
        self.point_total += other.point_total

    def scores(self) -> SegmentationScores:
        intersect = np.diag(self.confusion[:, :self.num_classes]).copy()
        area_label = self.confusion.sum(axis=1)
        area_pred = self.confusion[:, :self.num_classes].sum(axis=0)
        union = area_pred + area_label - intersect
        iou, acc = _ratio(intersect, union), _ratio(intersect, area_label)
        total = area_label.sum()
        frequency = _ratio(area_label, np.full_like(area_label, total)) if total else np.zeros(len(area_label))
        point_precision = _ratio(self.point_hits, self.point_total)
        points = self.point_total.sum()
        with np.errstate(all="ignore"):
            return SegmentationScores(
                iou=iou, acc=acc, area_intersect=intersect, area_union=union, area_pred=area_pred,
                area_label=area_label, aAcc=float(intersect.sum() / total) if total else float("nan"),
                mIoU=_nanmean(iou), mAcc=_nanmean(acc),
                fwIoU=float(np.nansum(frequency * iou)) if total else float("nan"),
                point_hits=self.point_hits.copy(), point_total=self.point_total.copy(),
                point_precision=point_precision,
                point_precision_overall=float(self.point_hits.sum() / points) if points else float("nan"))


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
