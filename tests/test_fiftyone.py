"""The labels as FiftyOne samples, checked with FiftyOne's own label classes: its rendering of each
Detection's cropped mask back into the frame equals the Parquet mask pixel for pixel, and a sample
survives FiftyOne's serialisation (what its database stores). FiftyOne's database (MongoDB) cannot
start on this machine, so ``to_fiftyone``'s last step, ``Dataset.add_samples``, is not run here."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # no usage reporting from a test run

import numpy as np
import pytest
from PIL import Image

import gemlabel
from pipeline.export.fiftyone_samples import fiftyone_box, media_name
from tests.known_output import CLASSES, SIZE, write_known_output

fo = pytest.importorskip("fiftyone")


@pytest.fixture
def known(tmp_path) -> tuple[str, dict]:
    (tmp_path / "shards").mkdir()
    masks = write_known_output(str(tmp_path / "shards"), str(tmp_path / "out"), keys=["k0", "dir/k 1", "k2"])
    return str(tmp_path / "out"), masks


def test_samples_hold_masks_scores_and_points_as_fiftyone_renders_them(known, tmp_path):
    output, masks = known
    labels = gemlabel.open_output(output)
    by_id = {s.sample_id: s for s in labels.samples()}
    samples = list(gemlabel.fiftyone_samples(output, str(tmp_path / "media")))
    assert sorted(s["sample_id"] for s in samples) == sorted(masks)
    for sample in samples:
        source = by_id[sample["sample_id"]]
        assert (sample.metadata.width, sample.metadata.height) == SIZE
        assert np.array_equal(np.asarray(Image.open(sample.filepath)), np.asarray(source.image))
        detections = sample["gemlabel"].detections
        assert [d.label for d in detections] == [l["name"] for l in source.labels]
        for detection, label in zip(detections, source.labels):
            assert detection.confidence == pytest.approx(label["score"])
            assert detection.area == label["area"]
            # FiftyOne draws the box-cropped mask back into the frame: exactly the label's pixels
            rendered = detection.to_segmentation(frame_size=SIZE, target=1).mask
            assert np.array_equal(rendered.astype(bool), masks[sample["sample_id"]][label["class_id"]])
            x, y, w, h = detection.bounding_box
            assert [round(x * SIZE[0]), round(y * SIZE[1]), round(w * SIZE[0]), round(h * SIZE[1])] == label["bbox"]
        points = sample["gemlabel_points"].keypoints
        assert [k.label for k in points] == [l["name"] for l in source.labels]
        for keypoint, label in zip(points, source.labels):
            (px, py), = keypoint.points
            assert (int(px * SIZE[0]), int(py * SIZE[1])) == (label["point_x"], label["point_y"])
        # what FiftyOne's database would store, read back: the same sample
        again = fo.Sample.from_dict(sample.to_dict())
        assert again["sample_id"] == sample["sample_id"]
        assert np.array_equal(again["gemlabel"].detections[0].mask, detections[0].mask)


def test_samples_filter_and_media_names_are_files(known, tmp_path):
    output, masks = known
    dogs = list(gemlabel.fiftyone_samples(output, str(tmp_path / "media"), classes=["dog"], label_field="pseudo"))
    assert len(dogs) == 3 and {d.label for s in dogs for d in s["pseudo"].detections} == {"dog"}
    names = {media_name(s) for s in gemlabel.open_output(output).samples()}
    assert len(names) == 3 and all("/" not in n.split("/", 1)[1] for n in names)
    files = sorted(p.name for p in (tmp_path / "media").rglob("*") if p.is_file())
    assert len(files) == 3 and not any(f.endswith(".partial") for f in files)
    assert CLASSES[1] == "dog"


@pytest.mark.parametrize("width,height", [(160, 120), (500, 375), (1023, 7), (4032, 3024)])
def test_boxes_come_back_as_the_same_pixels_through_fiftyones_conversion(width, height):
    """FiftyOne truncates relative boxes to pixels: every box edge must survive that exactly."""
    import fiftyone.utils.eta as foue
    for x in range(0, width, max(1, width // 97)):
        w = max(1, (width - x) // 3)
        rel = fiftyone_box([x, 0, w, height], width, height)
        box = foue.to_detected_object(fo.Detection(bounding_box=rel), extra_attrs=False).bounding_box
        assert box.coords_in(frame_size=(width, height)) == (x, 0, w, height)


def test_fiftyones_coco_importer_reads_the_coco_export(known, tmp_path):
    """FiftyOne's own COCO importer takes the COCO export: every instance with its score and its
    mask. Its conversion of pixel boxes to relative ones and back truncates, so some masks come
    back a pixel column or row off (why ``fiftyone_samples`` chooses its boxes itself)."""
    import json

    import fiftyone.utils.coco as fouc

    from pipeline.export.common import ExportOptions
    from pipeline.export.runner import run_export
    from pipeline.io.storage import Location
    from pipeline.store.labelset import open_labelset

    output, masks = known
    dest = tmp_path / "coco"
    run_export(open_labelset(Location(output)), ExportOptions("coco", Location(str(dest)), instances=True, images=True),
               progress=False)
    coco = json.load(open(dest / "annotations" / "train.json"))
    sample_of = {Path(i["file_name"]).name: i["sample_id"] for i in coco["images"]}
    importer = fouc.COCODetectionDatasetImporter(data_path=str(dest / "images" / "train"),
                                                 labels_path=str(dest / "annotations" / "train.json"),
                                                 label_types=["segmentations"])
    seen = 0
    with importer:
        for path, _, detections in importer:
            sample_id = sample_of[Path(path).name]
            scores = sorted(a["score"] for a in coco["annotations"]
                            if coco["images"][a["image_id"] - 1]["sample_id"] == sample_id)
            assert sorted(d.confidence for d in detections.detections) == pytest.approx(scores)
            for class_id, truth in masks[sample_id].items():
                union = np.zeros(truth.shape, dtype=bool)
                for detection in detections.detections:
                    if detection.label == CLASSES[class_id]:
                        union |= detection.to_segmentation(frame_size=SIZE, target=1).mask.astype(bool)
                assert (union & truth).sum() / (union | truth).sum() > 0.95
            seen += 1
    assert seen == len(masks)
