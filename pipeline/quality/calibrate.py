"""``gemlabel calibrate``: the post-processing settings that score best on ground truth.

The model runs once per image: each image's (C, h, w) patch-to-class similarities are computed
once and kept (they are small: a 448 px input with patch 16 and 20 classes is 62 KB). Then every
point of the grid (logit scale x background threshold x min area) is only post-processing, scored
with the same metric code as ``gemlabel eval``. The post-processing is ``gem.postprocess.label_image``
split in two (tested equal to it): the upsampling and softmax at the image's size, once per image
and logit scale, then per background threshold and min area only a threshold and a count. The best point is written as a YAML fragment ``gemlabel label --config``
reads.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from gem import GEMSegmenter, LabelingThresholds
from gem.postprocess import RegionStats, softmax_top_bands
from gem.vocabulary import Vocabulary
from pipeline.quality.classmap import ClassMapping
from pipeline.config import error_message
from pipeline.quality.groundtruth import GroundTruth, GroundTruthError
from pipeline.quality.metrics import SegmentationMetric
from pipeline.quality.plots import plot_grid
from pipeline.worker.decode import decode_sample


@dataclass
class Grid:
    logit_scale: list[float] = field(default_factory=lambda: [10.0, 25.0, 50.0, 100.0, 200.0])
    background_threshold: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    min_area: list[int] = field(default_factory=lambda: [1, 64, 256])

    def __post_init__(self):
        for name in ("logit_scale", "background_threshold", "min_area"):
            if not getattr(self, name):
                raise GroundTruthError(f"grid: {name} needs at least one value")
        try:  # the labelling's own checks, on every value
            for scale, threshold, area in itertools.product(self.logit_scale, self.background_threshold,
                                                            self.min_area):
                LabelingThresholds(logit_scale=scale, background_threshold=threshold, min_area=area)
        except ValidationError as err:
            raise GroundTruthError(f"grid: {error_message(err, 'thresholds')}") from None

    @property
    def size(self) -> int:
        return len(self.logit_scale) * len(self.background_threshold) * len(self.min_area)


@dataclass
class CachedImage:
    key: str
    similarities: dict[str, torch.Tensor]   # template set -> (C, h, w) float32, on the CPU
    target: np.ndarray           # (H, W) scored ground truth (mapped, 255 = ignore)


@dataclass
class Calibration:
    grid: Grid
    miou: np.ndarray             # (logit scales, background thresholds, min areas)
    points: list[dict]           # every grid point's settings and scores
    best: tuple[int, int, int]
    images: int
    model_seconds: float
    sweep_seconds: float
    templates: str = "config"    # the template set scored

    @property
    def best_thresholds(self) -> dict:
        i, j, k = self.best
        return {"logit_scale": self.grid.logit_scale[i], "background_threshold": self.grid.background_threshold[j],
                "min_area": self.grid.min_area[k]}


def compute_similarities(ground_truth: GroundTruth, segmenter: GEMSegmenter, vocabularies: dict[str, Vocabulary],
                         mapping: ClassMapping, input_size: tuple[int, int], batch_size: int = 16,
                         progress: bool = True, jpeg_draft: bool = False) -> list[CachedImage]:
    """One model pass per image, batched, decoding exactly as labelling decodes; the similarities
    to every template set's vocabulary (one text encoding each) come from that one pass: their
    embeddings are stacked into one vocabulary for ``patch_similarities``."""
    lookup = mapping.ground_truth_lookup()
    cached: list[CachedImage] = []
    batch: list = []
    names = list(vocabularies)
    sizes = [len(v) for v in vocabularies.values()]
    stacked = Vocabulary(tuple(n for v in vocabularies.values() for n in v.class_names), (),
                         torch.cat([v.embeddings for v in vocabularies.values()]))

    def run(batch: list) -> None:
        sims = segmenter.patch_similarities(torch.stack([d.tensor for d, _ in batch]), stacked).cpu()
        for (decoded, target), image_sims in zip(batch, sims):
            per_set = dict(zip(names, (part.clone() for part in image_sims.split(sizes))))
            cached.append(CachedImage(decoded.key, per_set, lookup[target]))

    for index, sample in enumerate(tqdm(ground_truth.samples(), total=ground_truth.count, unit="image",
                                        desc="model", disable=not progress, file=sys.stderr)):
        decoded = decode_sample(index, sample.raw(), input_size, segmenter.mean, segmenter.std,
                                jpeg_draft=jpeg_draft)
        if decoded.error:
            raise GroundTruthError(f"{sample.key}: {decoded.error}")
        if (decoded.height, decoded.width) != sample.target.shape:
            raise GroundTruthError(f"{sample.key}: image is {decoded.width}x{decoded.height} but its mask is "
                                   f"{sample.target.shape[1]}x{sample.target.shape[0]}")
        batch.append((decoded, sample.target))
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not cached:
        raise GroundTruthError("calibrate: the ground truth holds no images")
    return cached


@dataclass
class ClassScores:
    """label_image's first half for one image and logit scale: what every background threshold
    and min area of the grid start from."""

    top_prob: np.ndarray     # (H, W) float32: the top class's probability
    top_class: np.ndarray    # (H, W) int64
    peak_index: np.ndarray   # per class: flat index of its most probable pixel (first in raster order), -1: none


def class_scores(similarities: torch.Tensor, size: tuple[int, int], logit_scale: float) -> ClassScores:
    """label_image's bands, softmax and max (no pixel sent to the background yet) and its peaks,
    kept as full maps for every threshold of the grid (tested equal to label_image). One case
    differs: NaN probabilities (an overflowing model) count at every threshold, so a class whose
    pixels over the threshold are all NaN gets another point than label_image gives it."""
    height, width = size
    top_prob = np.empty((height, width), dtype=np.float32)
    top_class = np.empty((height, width), dtype=np.int64)
    peaks = RegionStats(similarities.shape[0], width, similarities.device)
    every_pixel = LabelingThresholds(logit_scale=float(logit_scale), background_threshold=0.0)
    for start, prob, cls in softmax_top_bands(similarities, size, every_pixel):
        peaks.add(start, prob, cls)
        top_prob[start:start + cls.shape[0]] = prob.cpu().numpy()
        top_class[start:start + cls.shape[0]] = cls.cpu().numpy()
    stats = peaks.result()
    return ClassScores(top_prob, top_class, np.where(stats.counts > 0, stats.peak_index, -1))


def reported_labels(scores: ClassScores, thresholds: LabelingThresholds) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """What label_image reports under ``thresholds``: the (H, W) map of reported classes (-1:
    none; classes under min_area are not reported) and each reported class's point (x, y, class)."""
    labels = np.where(scores.top_prob < thresholds.background_threshold, -1, scores.top_class)
    counts = np.bincount(labels[labels >= 0], minlength=len(scores.peak_index))
    kept = np.flatnonzero(counts >= thresholds.min_area)
    reported = np.where(np.isin(labels, kept), labels, -1)
    width = labels.shape[1]
    return reported, [(int(scores.peak_index[c] % width), int(scores.peak_index[c] // width), int(c)) for c in kept]


def sweep(cached: list[CachedImage], mapping: ClassMapping, grid: Grid, model_seconds: float = 0.0,
          progress: bool = True, templates: Optional[str] = None) -> Calibration:
    """Per image and logit scale, the class probabilities once; per background threshold and min
    area, the thresholding and scoring only."""
    shape = (len(grid.logit_scale), len(grid.background_threshold), len(grid.min_area))
    metrics = {index: SegmentationMetric(len(mapping.class_names)) for index in itertools.product(*map(range, shape))}
    prediction_of = np.array([mapping.no_class] + [mapping.class_of(name) for name in mapping.vocab], dtype=np.int32)
    mapped = np.array([name in mapping.vocab_to_class for name in mapping.vocab])
    templates = templates or next(iter(cached[0].similarities))
    start = time.perf_counter()
    with tqdm(total=len(grid.logit_scale) * len(cached), unit="image", desc=f"grid ({templates})", disable=not progress,
              file=sys.stderr) as bar:
        for i, scale in enumerate(grid.logit_scale):
            for image in cached:
                scores = class_scores(image.similarities[templates], image.target.shape, scale)
                for j, k in itertools.product(range(shape[1]), range(shape[2])):
                    thresholds = LabelingThresholds(
                        logit_scale=scale, background_threshold=grid.background_threshold[j], min_area=grid.min_area[k])
                    reported, points = reported_labels(scores, thresholds)
                    metric = metrics[i, j, k]
                    metric.update(prediction_of[reported + 1], image.target)
                    metric.update_points([(x, y, int(prediction_of[c + 1])) for x, y, c in points if mapped[c]],
                                         image.target)
                bar.update(1)
    miou = np.full(shape, np.nan)
    points = []
    for (i, j, k), metric in metrics.items():
        scores = metric.scores()
        miou[i, j, k] = scores.mIoU
        points.append({"logit_scale": grid.logit_scale[i], "background_threshold": grid.background_threshold[j],
                       "min_area": grid.min_area[k], **{name: _round(getattr(scores, name)) for name in
                                                        ("mIoU", "mAcc", "aAcc", "fwIoU")},
                       "point_precision": _round(scores.point_precision_overall)})
    if np.isnan(miou).all():
        raise GroundTruthError("calibrate: no grid point gives a score (no ground-truth class is evaluated)")
    best = tuple(int(v) for v in np.unravel_index(np.nanargmax(miou), shape))  # the first best, grid order
    return Calibration(grid, miou, points, best, len(cached), model_seconds, time.perf_counter() - start, templates)


def _round(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(float(value), 6)


def best_miou(calibration: Calibration) -> float:
    return float(calibration.miou[calibration.best])


NOT_IN_BEST = ("input", "output", "overwrite", "retry_failed", "storage_options", "ray_address")
"""Keys best.yaml leaves out: where to read and write (the user's next run's own), and storage
options, which may hold credentials."""


def best_config(settings: dict, calibration: "Calibration", template_specs: Optional[dict[str, object]]) -> dict:
    """A complete labelling config: every key in effect when calibrating (``settings``, the
    config's ``to_dict()``), its thresholds and templates replaced by the best, so that labelling
    with it alone (plus --input/--output) reproduces the labels that were scored."""
    config = {key: value for key, value in settings.items() if key not in NOT_IN_BEST and value is not None}
    config["thresholds"] = {**settings.get("thresholds", {}), **calibration.best_thresholds}
    if template_specs and calibration.templates in template_specs:
        config["templates"] = template_specs[calibration.templates]
    return config


def write_calibration(calibrations: list[Calibration], report_dir: str, extra: Optional[dict] = None,
                      template_specs: Optional[dict[str, object]] = None, settings: Optional[dict] = None) -> dict:
    """best.yaml (the labelling config that scored best: ``best_config`` of ``settings``; without
    them, a fragment of the best thresholds and templates; ``template_specs`` maps set name -> its
    ``templates:`` value), calibration.json, calibration.png (the best set's grid)."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    calibration = max(calibrations, key=best_miou)  # the first best on ties
    best_point = calibration.points[int(np.ravel_multi_index(calibration.best, calibration.miou.shape))]
    if settings is not None:
        fragment = best_config(settings, calibration, template_specs)
    else:
        fragment = {"thresholds": calibration.best_thresholds}
        if template_specs and len(calibrations) > 1:
            fragment["templates"] = template_specs[calibration.templates]
    header = (f"# gemlabel calibrate: best of {calibration.grid.size * len(calibrations)} settings on "
              f"{calibration.images} images (mIoU {100 * best_point['mIoU']:.2f}%).\n"
              "# Use: gemlabel label --config this.yaml --input SHARDS --output OUT (every labelling key is here;\n"
              "# storage_options and ray_address are not: give them as for any run)\n")
    (out / "best.yaml").write_text(header + yaml.safe_dump(fragment, sort_keys=False), encoding="utf-8")
    record = {"best": {**calibration.best_thresholds, "templates": calibration.templates,
                       **{k: best_point[k] for k in ("mIoU", "aAcc", "fwIoU")}},
              "images": calibration.images, "grid": calibration.grid.__dict__, "points": calibration.points,
              "template_sets": {c.templates: {"best_mIoU": _round(best_miou(c)), **c.best_thresholds,
                                              "points": c.points} for c in calibrations},
              "model_seconds": round(calibration.model_seconds, 4),
              "sweep_seconds": round(sum(c.sweep_seconds for c in calibrations), 4),
              "seconds_per_grid_point": round(sum(c.sweep_seconds for c in calibrations)
                                              / (calibration.grid.size * len(calibrations)), 4),
              **(extra or {})}
    (out / "calibration.json").write_text(json.dumps(record, indent=1, allow_nan=False), encoding="utf-8")
    plot_grid(calibration.miou, calibration.grid.logit_scale, calibration.grid.background_threshold,
              calibration.grid.min_area, calibration.best, out / "calibration.png")
    return record
