"""Each instance (connected component) of a class gets its own score, the mean probability over
its pixels (issue 20): kept per pixel by ``label_map``, scored per component by the labeller,
carried by COCO's instance export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

from gem.postprocess import class_regions, label_map
from gem.settings import LabelingThresholds
from pipeline.export.common import ExportOptions
from pipeline.export.runner import run_export
from pipeline.io.storage import Location
from pipeline.masks.components import components, instance_of, instance_scores
from pipeline.store.labelset import open_labelset
from tests.outputs import all_rows


def test_instance_scores_are_the_mean_softmax_probability_of_each_component():
    torch.manual_seed(3)
    similarities = torch.randn(4, 7, 9) * 0.05
    size, thresholds = (90, 120), LabelingThresholds(background_threshold=0.0, min_area=4)
    labels, stats = label_map(similarities, size, thresholds)
    top = torch.softmax(F.interpolate(similarities[None] * thresholds.logit_scale, size, mode="bilinear",
                                      align_corners=False)[0], dim=0).max(dim=0).values.numpy()
    assert np.allclose(stats.pixel_prob.astype(np.float32), top, atol=1e-3)  # float16: 3 digits
    several = 0
    for region in class_regions(labels, stats, thresholds.min_area):
        scored = instance_scores(labels, stats.pixel_prob, region.class_id, region.bbox, region.score,
                                 thresholds.min_area)
        cut = components(region.mask, thresholds.min_area)  # what the COCO export cuts
        assert len(scored) == len(cut) and [s["area"] for s in scored] == [c.area for c in cut]
        for component in cut:
            instance = instance_of({"instances": scored}, component)
            assert instance is not None and instance["area"] == component.area
            assert instance["score"] == pytest.approx(float(top[component.mask].mean()), abs=1e-3)
        if len(cut) == 1:
            assert scored[0]["score"] == region.score  # the class's own mean, at full precision
        several += len({round(s["score"], 4) for s in scored}) > 1
    assert several, "no class with instances of different scores: the case under test did not occur"


def test_coco_instances_of_a_labelled_output_score_their_own_pixels(labelled_output, tmp_path):
    dest = tmp_path / "coco"
    run_export(open_labelset(Location(labelled_output)), ExportOptions("coco", Location(str(dest)), instances=True),
               progress=False)
    coco = COCO(str(dest / "annotations" / "train.json"))
    images = {image["sample_id"]: image["id"] for image in coco.dataset["images"]}
    checked = 0
    for row in all_rows(labelled_output):
        if row["status"] != "ok" or row["sample_id"] not in images:
            continue
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[images[row["sample_id"]]]))
        for label in row["labels"]:
            mine = [a for a in anns if a["category_id"] == label["class_id"] + 1]
            assert [a["area"] for a in mine] == [i["area"] for i in label["instances"]]
            assert [a["score"] for a in mine] == [pytest.approx(i["score"], rel=1e-6) for i in label["instances"]]
            if sum(i["area"] for i in label["instances"]) == label["area"]:  # no component left out
                mean = sum(a["score"] * a["area"] for a in mine) / label["area"]
                assert mean == pytest.approx(label["score"], abs=1e-3)  # the instances make up the class
                checked += 1
    assert checked
