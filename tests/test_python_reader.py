"""The Python reader (``gemlabel.open_output``): samples with lazily read, EXIF-applied images and
their labels, filters, and supervision Detections checked with supervision's own annotators and
``sv.DetectionDataset``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import s3fs
from PIL import Image

import gemlabel
from pipeline.io.tar import iter_tar_samples
from pipeline.io.storage import Location
from tests.conftest import S3_CREDENTIALS
from tests.known_output import CLASSES, SIZE, write_known_output

sv = pytest.importorskip("supervision")


def tar_images(shard: Path) -> dict[str, Image.Image]:
    with tarfile.open(shard) as tar:
        return {m.name.split(".")[0]: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                for m in tar.getmembers() if m.name.startswith("k")}


@pytest.fixture
def known(tmp_path) -> tuple[str, dict]:
    (tmp_path / "shards").mkdir()
    masks = write_known_output(str(tmp_path / "shards"), str(tmp_path / "out"))
    return str(tmp_path / "out"), masks


def test_samples_carry_their_labels_and_read_their_image_only_when_asked(known, tmp_path):
    output, masks = known
    labels = gemlabel.open_output(output)
    shard = tmp_path / "shards" / "known-0000.tar"
    hidden = shard.rename(tmp_path / "hidden.tar")  # listing samples reads no image
    samples = list(labels.samples())
    assert [s.sample_id for s in samples] == sorted(masks)  # the error sample has no image: skipped
    for sample in samples:
        assert (sample.width, sample.height) == SIZE
        assert {CLASSES[l["class_id"]] for l in sample.labels} == {CLASSES[c] for c in masks[sample.sample_id]}
        for label, mask in zip(sample.labels, sample.masks()):
            assert np.array_equal(mask, masks[sample.sample_id][label["class_id"]])
    with pytest.raises(Exception, match="known-0000.tar"):
        samples[0].image
    hidden.rename(shard)
    originals = tar_images(shard)
    for sample in labels.samples():
        assert np.array_equal(np.asarray(sample.image), np.asarray(originals[sample.key]))
    assert samples[2].image.size == SIZE and samples[0].image.size == SIZE  # an image already passed: reopened


def test_samples_filter_by_class_score_and_shard(known):
    output, masks = known
    labels = gemlabel.open_output(output)
    sofas = list(labels.samples(classes=["sofa"]))
    assert len(sofas) == 3 and all([l["name"] for l in s.labels] == ["sofa"] for s in sofas)
    assert [l["class_id"] for l in next(labels.samples(classes=[1, "car"])).labels] == [1, 3]
    high = list(labels.samples(min_score=0.65))  # scores are 0.5 + 0.1 * class_id
    assert {l["name"] for s in high for l in s.labels} == {"sofa", "car"}
    assert list(labels.samples(classes=["person"])) == []  # in the vocabulary, never found
    shard_url = next(iter(labels.markers.values()))["shard"]
    assert len(list(labels.samples(shards=[shard_url]))) == len(list(labels.samples(shards=labels.shard_ids()))) == 3
    with pytest.raises(ValueError, match="unicorn"):
        list(labels.samples(classes=["unicorn"]))
    with pytest.raises(ValueError, match="nope.tar"):
        list(labels.samples(shards=["s3://x/nope.tar"]))


def test_detections_draw_with_supervisions_annotators(known):
    output, masks = known
    sample = next(gemlabel.open_output(output).samples())
    detections = sample.to_detections()
    truth = masks[sample.sample_id]
    assert len(detections) == len(truth)
    assert list(detections.class_id) == sorted(truth)
    assert list(detections.data["class_name"]) == [CLASSES[c] for c in sorted(truth)]
    assert set(detections.data["sample_id"]) == {sample.sample_id}
    assert np.allclose(detections.confidence, [0.5 + 0.1 * c for c in sorted(truth)])
    for (x, y), mask in zip(detections.data["point"], detections.mask):
        assert mask[y, x]
    # the boxes are COCO's corners: sv's own mask -> box gives the last pixel, one less
    assert np.array_equal(detections.xyxy, sv.mask_to_xyxy(detections.mask) + [0, 0, 1, 1])
    scene = np.asarray(sample.image).copy()
    painted = sv.MaskAnnotator(opacity=1.0, color_lookup=sv.ColorLookup.CLASS).annotate(scene.copy(), detections)
    expected = scene.copy()
    for class_id, mask in truth.items():
        expected[mask] = sv.ColorPalette.DEFAULT.by_idx(class_id).as_bgr()
    assert np.array_equal(painted, expected)
    labelled = sv.LabelAnnotator().annotate(sv.BoxAnnotator().annotate(scene.copy(), detections), detections)
    assert labelled.shape == scene.shape and not np.array_equal(labelled, scene)


def test_detections_equal_supervisions_reading_of_the_coco_export(known, tmp_path):
    """``sv.DetectionDataset.from_coco`` of the COCO export (written by the exporter's own shard
    step, without a cluster) gives each image the detections ``to_detections`` gives."""
    from pipeline.export import coco
    from pipeline.export.common import ExportOptions
    from pipeline.export.runner import export_shard
    output, masks = known
    labels = gemlabel.open_output(output)
    options = ExportOptions("coco", Location(str(tmp_path / "coco")), images=True, image_format="png")
    for shard_id in labels.shard_ids():
        export_shard(labels, shard_id, options)
    coco.finish(labels, labels.shard_ids(), options)
    dataset = sv.DetectionDataset.from_coco(str(tmp_path / "coco" / "images" / "train"),
                                            str(tmp_path / "coco" / "annotations" / "train.json"), force_masks=True)
    ours = {sample.key: sample for sample in labels.samples()}
    assert dataset.classes == labels.class_names and len(dataset) == len(ours) == 3
    for path, image, theirs in dataset:
        sample = ours[Path(path).stem.rsplit("__", 1)[-1]]
        mine = sample.to_detections()
        assert np.array_equal(image[..., ::-1], np.asarray(sample.image))  # sv reads BGR
        assert np.array_equal(theirs.class_id, mine.class_id)
        assert np.array_equal(theirs.xyxy, mine.xyxy)
        assert np.array_equal(theirs.mask, mine.mask)
        assert sum(m.sum() for m in mine.mask) == sum(m.sum() for m in masks[sample.sample_id].values())


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """``image`` stored turned 90 degrees with EXIF orientation 6, which shows it upright again."""
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_reads_an_output_on_s3_with_exif_applied(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("reader-bucket")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    masks = write_known_output("s3://reader-bucket/shards", "s3://reader-bucket/labels", storage_options=options,
                               local_tmp=tmp_path)
    shard = Location("s3://reader-bucket/shards/known-0000.tar", options)
    upright = {raw["__key__"]: Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
               for raw in iter_tar_samples(shard) if raw["__key__"] != "broken"}
    with tarfile.open(tmp_path / "rotated.tar", "w") as tar:  # the same photos, stored sideways
        for key, image in upright.items():
            data = exif_rotated_jpeg(image)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes_atomic((tmp_path / "rotated.tar").read_bytes())
    labels = gemlabel.open_output("s3://reader-bucket/labels", storage_options=options)
    samples = list(labels.samples(classes=["dog"]))
    assert [s.sample_id for s in samples] == sorted(masks)
    for sample in samples:
        assert sample.image.size == SIZE  # upright, as labelled
        difference = np.abs(np.asarray(sample.image, float) - np.asarray(upright[sample.key], float)).mean()
        assert difference < 4  # JPEG re-encoding only
        assert np.array_equal(sample.masks()[0], masks[sample.sample_id][1])
