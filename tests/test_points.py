"""Prompt points per connected component: computed in the pipeline, written in the Parquet,
exported SA-1B style (point_coords)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.masks.components import prompt_points
from pipeline.config import ConfigError, load_config
from pipeline.export.common import ExportOptions
from pipeline.export.runner import run_export
from pipeline.store.labelset import label_mask, open_labelset
from pipeline.driver.run import run_labeling
from pipeline.io.storage import Location
from tests.outputs import all_rows, check_labels
from tests.shards import write_shards


def test_one_point_per_component_the_peak_first_then_largest_first():
    mask = np.zeros((60, 90), bool)
    mask[5:25, 5:35] = True      # 600 px, holds the peak
    mask[30:55, 50:85] = True    # 875 px
    mask[40:44, 5:9] = True      # 16 px
    points = prompt_points(mask, (10, 10), 0.9, 0.6, "per_component", max_points=2)
    assert points[0] == {"x": 10, "y": 10, "score": 0.9}  # the peak stands for its own component
    assert points[1]["x"] in range(50, 85) and points[1]["y"] in range(30, 55) and points[1]["score"] == 0.6
    assert len(prompt_points(mask, (10, 10), 0.9, 0.6, "per_component", max_points=5)) == 3
    assert prompt_points(mask, (10, 10), 0.9, 0.6, "peak", max_points=5) == [{"x": 10, "y": 10, "score": 0.9}]
    # the peak in the smallest component is still there, first (it was dropped: not among the largest 2)
    small_peak = prompt_points(mask, (6, 41), 0.9, 0.6, "per_component", max_points=2)
    assert small_peak[0] == {"x": 6, "y": 41, "score": 0.9} and small_peak[1]["x"] in range(50, 85)
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[12:28, 12:28] = False
    (point,) = prompt_points(ring, (5, 5), 0.9, 0.6, "per_component")
    assert point == {"x": 5, "y": 5, "score": 0.9}


@pytest.mark.usefixtures("ray_session")
def test_per_component_points_in_parquet_and_coco(base_config, tmp_path):
    write_shards(tmp_path / "in", shards=1, per_shard=4)
    peak_only = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")]})
    assert "points" not in peak_only.fingerprint_source(["a"], ["{}"])  # old outputs keep their fingerprint
    settings = {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "points": "per_component",
                "max_points": 2}
    assert run_labeling(load_config(None, settings)).shards_done == 1
    rows = all_rows(settings["output"])
    for row in rows:
        check_labels(row)
        for label in row["labels"]:
            mask = label_mask(label)
            expected = prompt_points(mask, (label["point_x"], label["point_y"]), label["peak_score"],
                                     label["score"], "per_component", 2)
            assert [{**p, "score": pytest.approx(p["score"])} for p in expected] == label["points"]
            assert 1 <= len(label["points"]) <= 2 and all(mask[p["y"], p["x"]] for p in label["points"])
    with pytest.raises(ConfigError, match="changed: max_points, points"):
        run_labeling(load_config(None, {**settings, "points": "peak"}))
    with pytest.raises(ConfigError, match="points: one of"):
        load_config(None, {**settings, "points": "everywhere"})

    dest = str(tmp_path / "coco")
    run_export(open_labelset(Location(settings["output"])), ExportOptions("coco", Location(dest)), progress=False)
    coco = COCO(str(Path(dest) / "annotations" / "train.json"))
    by_sample = {image["sample_id"]: image["id"] for image in coco.dataset["images"]}
    for row in rows:
        anns = {a["category_id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[by_sample[row["sample_id"]]]))}
        for label in row["labels"]:
            assert anns[label["class_id"] + 1]["point_coords"] == [[p["x"], p["y"]] for p in label["points"]]


def test_per_component_outputs_of_the_earlier_point_order_are_not_continued():
    """Points used to be largest component first (the peak could be dropped); a run of today's
    order on such an output must not mix the two orders: its fingerprint differs."""
    from pipeline.config import fingerprint, load_config
    config = load_config(None, {"input": ["a.tar"], "output": "o", "vocab": ["cat"], "points": "per_component"})
    source = config.fingerprint_source(["cat"], ["a photo of a {}."])
    earlier = {key: value for key, value in source.items() if key != "points_order"}
    assert fingerprint(source) != fingerprint(earlier)
    peak = load_config(None, {"input": ["a.tar"], "output": "o", "vocab": ["cat"]})
    assert "points_order" not in peak.fingerprint_source(["cat"], ["a photo of a {}."])  # default outputs keep theirs
