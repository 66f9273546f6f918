"""``gemlabel eval``: score a gemlabel output (or label the ground truth's images first) against
ground truth, image by image, matching labels and masks by sample key.

The labels are read the way any consumer reads them: the output's stats markers name its Parquet
files (pipeline.store.layout), each label's COCO RLE is decoded (pipeline.store.rle), painted into one
prediction map per image, and scored with pipeline.quality.metrics.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.quality.classmap import ClassMapping
from pipeline.config import LabelConfig
from pipeline.store.rle import decode_mask
from pipeline.quality.groundtruth import GroundTruth, GroundTruthError, GroundTruthSample
from pipeline.store.labelset import NotAnOutputError, open_labelset
from pipeline.quality.metrics import SegmentationMetric
from pipeline.io.storage import Location, normalize_url

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metric: SegmentationMetric
    mapping: ClassMapping
    images_scored: int = 0
    images_missing: list[str] = field(default_factory=list)   # ground truth without labels
    images_failed: list[str] = field(default_factory=list)    # labelled with status error


class OutputRows:
    """The rows of an output, found for a ground-truth sample by shard and name in the shard when
    the ground truth is in shards (keys may repeat across shards), else by key."""

    def __init__(self, rows: list[dict]):
        self.by_shard: dict[tuple[str, str], dict] = {}
        self.by_key: dict[str, dict] = {}
        self.repeated: set[str] = set()
        for row in rows:
            self.by_shard[(normalize_url(row["shard"]), row["sample_id"].split("/", 1)[1])] = row
            if row["key"] in self.by_key:
                self.repeated.add(row["key"])
            else:
                self.by_key[row["key"]] = row
        self._warned = False

    def find(self, sample: GroundTruthSample) -> Optional[dict]:
        if sample.shard is not None:
            row = self.by_shard.get((normalize_url(sample.shard), sample.uid or sample.key))
            if row is not None:
                return row
        if sample.key in self.repeated and not self._warned:
            self._warned = True
            log.warning("key %s (and maybe others) is in more than one labelled shard; scoring the first", sample.key)
        return self.by_key.get(sample.key)


def read_output_rows(output: Location) -> tuple[list[str], OutputRows]:
    """(class labels, the rows) of every done shard of a gemlabel output, read as every consumer
    reads one (``open_labelset``)."""
    try:
        labels = open_labelset(output)
    except NotAnOutputError:
        raise GroundTruthError(f"--labels {output}: not a gemlabel output with labelled shards") from None
    return labels.class_names, OutputRows(list(labels.all_rows()))


def prediction_from_row(row: dict, mapping: ClassMapping) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A labelled row -> (H, W) map of ground-truth class indices and its points (x, y, class)."""
    pred = np.full((row["height"], row["width"]), mapping.no_class, dtype=np.int32)
    points = []
    for label in row["labels"]:
        class_id = mapping.class_of(label["name"])
        pred[decode_mask(label["rle_size"], label["rle_counts"])] = class_id
        if label["name"] in mapping.vocab_to_class:
            points.append((label["point_x"], label["point_y"], class_id))
    return pred, points


def score_rows(ground_truth: GroundTruth, rows: OutputRows, mapping: ClassMapping,
               progress: bool = True) -> EvalResult:
    metric = SegmentationMetric(len(mapping.class_names))
    result = EvalResult(metric, mapping)
    lookup = mapping.ground_truth_lookup()
    for sample in tqdm(ground_truth.samples(), total=ground_truth.count, unit="image", desc="scoring",
                       disable=not progress, file=sys.stderr):
        row = rows.find(sample)
        if row is None:
            result.images_missing.append(sample.key)
            continue
        if row["status"] != "ok":
            result.images_failed.append(sample.key)
            continue
        if (row["height"], row["width"]) != sample.target.shape:
            raise GroundTruthError(f"{sample.key}: labels are {row['width']}x{row['height']} but its mask is "
                                   f"{sample.target.shape[1]}x{sample.target.shape[0]}")
        pred, points = prediction_from_row(row, mapping)
        target = lookup[sample.target]
        metric.update(pred, target)
        metric.update_points(points, target)
        result.images_scored += 1
    if not result.images_scored:
        raise GroundTruthError(f"no ground-truth image has labels to score (e.g. key {result.images_missing[:1]}); "
                               "keys must match the labelled samples' keys")
    return result


def write_image_shards(ground_truth: GroundTruth, prefix: str, per_shard: int = 1000) -> list[str]:
    """The ground truth's images as webdataset shards with the same keys, to label them."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(f"{prefix}-%06d.tar", maxcount=per_shard, verbose=0, post=written.append) as sink:
        for sample in ground_truth.samples():
            sink.write(sample.raw())
    return written


def label_ground_truth(ground_truth: GroundTruth, config: LabelConfig, work_dir: str) -> tuple[str, float]:
    """Label the ground truth's images with ``config`` (its output) through the labelling pipeline
    itself; returns (output, seconds). Images in folders or COCO are packed into shards first."""
    from pipeline.driver.run import run_labeling  # Ray only where eval labels
    shards = ground_truth.shards or write_image_shards(ground_truth, str(Path(work_dir) / "shards" / "gt"))
    config.input = list(shards)
    start = time.perf_counter()
    summary = run_labeling(config)
    if summary.shards_failed:
        raise RuntimeError(f"labelling failed for {summary.shards_failed} shard(s): {summary.failed}")
    return config.output, time.perf_counter() - start
