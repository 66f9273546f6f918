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
    # the PyTorch stream's detection targets carry the same per-instance scores
    from gemlabel import LabelStream
    stream_scores = {target["sample_id"]: sorted(target["scores"].tolist())
                     for _, target in LabelStream(labelled_output, "detection", min_area=16)}
    for sample_id, image_id in images.items():
        if sample_id in stream_scores:
            coco_scores = sorted(a["score"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])))
            assert stream_scores[sample_id] == pytest.approx(coco_scores, rel=1e-6)


def _label(config_overrides: dict, micro_checkpoint: str):
    from pipeline.config import load_config
    from pipeline.driver.run import run_labeling
    from tests.models import MICRO_CONFIG
    config = load_config(None, {"vocab": ["person", "dog", "sofa", "car"], "model": "gemtest-micro",
                                "pretrained": micro_checkpoint, "model_config": str(MICRO_CONFIG), "gem": {"depth": 3},
                                "input_size": [64, 64], "batch_size": 4, "cpus_per_worker": 0.5, "decode_threads": 1,
                                "progress": False, **config_overrides})
    return run_labeling(config, out=open("/dev/null", "w"), summary_out=open("/dev/null", "w"))


def test_an_output_begun_before_instances_is_continued_without_them(ray_session, micro_checkpoint, tmp_path,
                                                                     monkeypatch):
    """A scheduled run over an output labelled before ``instances`` existed: its shards are not
    relabelled, new shards are written in its schema, and the root still reads as one table."""
    import dataclasses

    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.config import fingerprint
    from pipeline.driver import plan, run
    from tests.shards import write_shards
    from tests.test_output_table import read_everywhere

    def before_instances(config, claimed=None):  # what the code before instances built
        spec = dataclasses.replace(plan.build_spec(config), instances=False)
        return dataclasses.replace(spec, fingerprint=fingerprint(spec.source))

    first = write_shards(tmp_path / "in", shards=2, per_shard=3, stem="a")
    output = str(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(run, "build_spec", before_instances)
        assert _label({"input": [str(s) for s in first], "output": output}, micro_checkpoint).shards_done == 2
    second = write_shards(tmp_path / "in", shards=1, per_shard=3, stem="b")
    summary = _label({"input": [str(s) for s in [*first, *second]], "output": output}, micro_checkpoint)
    assert (summary.shards_done, summary.shards_skipped) == (1, 2)  # nothing relabelled
    files = sorted((tmp_path / "out" / "labels").glob("*.parquet"))
    assert len(files) == 3
    for file in files:  # one schema: without instances
        assert "instances" not in pq.read_schema(file).field("labels").type.value_type.names
    for reader, ids in read_everywhere(output, str(tmp_path / "hf")).items():
        assert len(ids) == 9, reader
    assert len(pd.read_parquet(output)) == 9
    # a new output has them
    fresh = str(tmp_path / "fresh")
    assert _label({"input": [str(s) for s in second], "output": fresh}, micro_checkpoint).shards_done == 1
    (file,) = (tmp_path / "fresh" / "labels").glob("*.parquet")
    assert "instances" in pq.read_schema(file).field("labels").type.value_type.names


def test_instance_scores_can_be_turned_off_and_that_is_another_output(base_config, tmp_path):
    from collections import Counter

    from pipeline.config import load_config
    from pipeline.driver.plan import build_spec
    from pipeline.io.shards import Shard
    from pipeline.worker.decode import DecodedSample
    from pipeline.worker.labeler import ShardLabeler

    on = load_config(None, {**base_config, "input": ["unused.tar"]})
    off = load_config(None, {**base_config, "input": ["unused.tar"], "instance_scores": False})
    assert "instance_scores" not in on.fingerprint_source(["a"], ["{}"])  # outputs made before keep theirs
    assert build_spec(on).fingerprint != build_spec(off).fingerprint  # never mixed in one output
    torch.manual_seed(0)
    batch = [DecodedSample(i, f"k{i}", 80, 60, tensor=torch.randn(3, 128, 128)) for i in range(2)]
    for config, has in ((on, True), (off, False)):
        rows = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)._rows_for_batch(
            Shard("s.tar", "s-1"), batch, timings=Counter())
        labels = [label for row in rows for label in row["labels"]]
        assert labels and all(bool(label["instances"]) == has for label in labels)
