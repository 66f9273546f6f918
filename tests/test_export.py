"""gemlabel export on real outputs: COCO (pycocotools round trip), semantic PNGs, YOLO polygons;
Ray tasks per shard, resumable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from jobs.cli import main
from pipeline.masks.components import components, polygons, rasterize
from pipeline.masks.palette import class_color
from pipeline.export.common import ExportOptions
from pipeline.export.runner import run_export
from pipeline.store.labelset import label_mask, open_labelset
from pipeline.io.storage import Location
from tests.known_output import CLASSES, write_known_output, write_masks_output
from tests.outputs import all_rows, strict_json

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def known_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    (root / "shards").mkdir()
    known = write_known_output(str(root / "shards"), str(root / "out"))
    return str(root / "out"), known


def coco_masks(coco: COCO, image_id: int) -> dict[int, np.ndarray]:
    """category id -> union of the image's annotation masks."""
    union: dict[int, np.ndarray] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        mask = coco.annToMask(ann).astype(bool)
        assert mask.sum() == ann["area"] and ann["iscrowd"] == 0  # holes or not: COCOeval scores it
        x, y, w, h = (int(v) for v in ann["bbox"])
        assert mask[y:y + h, x:x + w].sum() == ann["area"]
        assert all(mask[py, px] for px, py in ann["point_coords"])
        union[ann["category_id"]] = union.get(ann["category_id"], False) | mask
    return union


def test_coco_export_round_trips_through_pycocotools_and_resumes(labelled_output, tmp_path):
    dest = str(tmp_path / "coco")
    assert main(["export", labelled_output, "--format", "coco", "--dest", dest, "--images",
                 "--splits", "train=*train-*,val=*val-*", "--no-progress"]) == 0
    rows = {row["sample_id"]: row for row in all_rows(labelled_output)}
    seen = set()
    for split, expected_shards in (("train", 2), ("val", 1)):
        coco = COCO(str(Path(dest) / "annotations" / f"{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["person", "dog", "sofa", "car"]
        for image in coco.loadImgs(coco.getImgIds()):
            row = rows[image["sample_id"]]
            seen.add(image["sample_id"])
            assert row["status"] == "ok" and (image["width"], image["height"]) == (row["width"], row["height"])
            with Image.open(Path(dest) / "images" / split / image["file_name"]) as copied:
                assert copied.size == (row["width"], row["height"])
            union = coco_masks(coco, image["id"])
            assert set(union) == {label["class_id"] + 1 for label in row["labels"]}
            for label in row["labels"]:
                assert np.array_equal(union[label["class_id"] + 1], label_mask(label))
        assert len({i["sample_id"].split("/")[0] for i in coco.loadImgs(coco.getImgIds())}) == expected_shards
    assert seen == {sid for sid, row in rows.items() if row["status"] == "ok"}  # error rows left out

    # A rerun skips the exported shards; a lost done marker redoes that shard only.
    labelset = open_labelset(Location(labelled_output))
    options = ExportOptions("coco", Location(dest), images=True, splits={"train": "*train-*", "val": "*val-*"})
    assert (run_export(labelset, options, progress=False).shards_skipped) == 3
    victim = sorted((Path(dest) / "_done").iterdir())[0]
    victim.unlink()
    again = run_export(labelset, options, progress=False)
    assert (again.shards_done, again.shards_skipped, again.images) == (1, 2, 12)
    # Other options (instances) redo every shard.
    assert run_export(labelset, ExportOptions("coco", Location(dest), instances=True, splits=options.splits),
                      progress=False).shards_done == 3


def test_coco_instances_are_the_components_and_union_to_the_class_mask(known_output, tmp_path):
    output, known = known_output
    dest = str(tmp_path / "inst")
    summary = run_export(open_labelset(Location(output)), ExportOptions("coco", Location(dest), instances=True),
                         progress=False)
    assert (summary.shards_done, summary.images, summary.error_rows) == (1, 3, 1)
    coco = COCO(str(Path(dest) / "annotations" / "train.json"))
    rows = {row["sample_id"]: row for row in all_rows(output)}
    for image in coco.loadImgs(coco.getImgIds()):
        masks = known[image["sample_id"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        per_class = {c: [a for a in anns if a["category_id"] == c + 1] for c in masks}
        assert [len(per_class[c]) for c in (1, 2, 3)] == [2, 1, 2]  # two discs, a ring, an ellipse + speck
        assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)  # compressed RLE
        label_of = {label["class_id"]: label for label in rows[image["sample_id"]]["labels"]}
        for class_id, class_anns in per_class.items():  # the peak's instance: the peak's score
            label = label_of[class_id]
            holds_peak = [coco.annToMask(a)[label["point_y"], label["point_x"]] == 1 for a in class_anns]
            assert sum(holds_peak) == 1
            assert [a["score"] for a in class_anns] == [
                pytest.approx(label["peak_score"] if peak else label["score"]) for peak in holds_peak]
        union = coco_masks(coco, image["id"])
        for class_id, mask in masks.items():
            assert np.array_equal(union[class_id + 1], mask)

    big = str(tmp_path / "big")
    run_export(open_labelset(Location(output)), ExportOptions("coco", Location(big), instances=True, min_area=10),
               progress=False)
    coco = COCO(str(Path(big) / "annotations" / "train.json"))
    assert min(a["area"] for a in coco.dataset["annotations"]) >= 10
    assert len(coco.getAnnIds(catIds=[4])) == 3  # the car's speck is gone, one ellipse per image


def detectron2_read_sem_seg(path) -> np.ndarray:
    """detectron2's DatasetMapper: ``utils.read_image(file, "L").squeeze(2)``, i.e. PIL open, EXIF
    orientation applied, ``convert("L")``, as an (H, W, 1) array (detectron2 itself does not install
    here: this is its ``read_image`` / ``convert_PIL_to_numpy`` for format "L", line for line)."""
    from PIL import ImageOps
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("L")
        return np.expand_dims(np.asarray(image), -1).squeeze(2)


def test_export_min_area_defaults_to_the_labelling_runs(tmp_path):
    """Labelled with thresholds.min_area 16, instances under 16 pixels are left out unless
    --min-area asks for them (the default was 1 whatever the run had used)."""
    from tests.known_output import blob_masks
    from tests.shards import photo
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    write_masks_output(str(tmp_path / "shards"), output, {f"k{i}": (photo(i, (160, 120)), blob_masks(i))
                                                          for i in range(2)},
                       CLASSES, {"thresholds": {"logit_scale": 100.0, "background_threshold": 0.5, "min_area": 16}})
    areas = {}
    for flags in ([], ["--min-area", "1"]):
        dest = tmp_path / f"coco{len(flags)}"
        assert main(["export", output, "--format", "coco", "--instances", "--dest", str(dest), "--no-progress",
                     *flags]) == 0
        areas[len(flags)] = sorted(a["area"] for a in json.loads((dest / "annotations" / "train.json").read_text())
                                   ["annotations"])
        lines = ["yolo-seg", "--dest", str(tmp_path / f"yolo{len(flags)}")]
        assert main(["export", output, "--format", *lines, "--no-progress", *flags]) == 0
        stems = sorted((tmp_path / f"yolo{len(flags)}" / "labels" / "train").iterdir())
        assert sum(len(p.read_text().splitlines()) for p in stems) == len(areas[len(flags)])
    assert areas[0] == [a for a in areas[2] if a >= 16] and areas[2][:2] == [3, 3]  # the car's specks


def test_semantic_export_label_maps_read_as_class_indices_by_pil_cv2_and_detectron2(known_output, tmp_path):
    """Grey 8-bit PNGs by default: every loader gets the class indices (a palette PNG gave
    detectron2 luminance and cv2 colours); --palette keeps a viewer's palette PNG. PIL's array is
    also mmseg's read (mmcv ``imfrombytes(flag="unchanged")``, pillow backend); cv2's
    IMREAD_UNCHANGED its cv2 backend."""
    import cv2
    output, known = known_output
    for background, offset in ((255, 0), (0, 1)):
        dest = tmp_path / f"sem{background}"
        assert main(["export", output, "--format", "semantic", "--dest", str(dest), "--images",
                     "--background-index", str(background), "--no-progress"]) == 0
        classes = json.loads((dest / "classes.json").read_text())
        assert classes["classes"] == CLASSES and classes["background_index"] == background
        assert (dest / "classes.txt").read_text().split("\n")[:4] == CLASSES
        for sample_id, masks in known.items():
            stem = sample_id.replace("/", "__")
            png = dest / "ann_dir" / "train" / f"{stem}.png"
            assert (dest / "img_dir" / "train" / f"{stem}.jpg").is_file()
            expected = np.full(masks[1].shape, background, dtype=np.uint8)
            for class_id, mask in masks.items():
                expected[mask] = class_id + offset
            with Image.open(png) as image:
                assert image.mode == "L"
                pil = np.asarray(image)
            unchanged = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            assert unchanged.dtype == np.uint8 and unchanged.shape == expected.shape
            for values in (pil, unchanged, detectron2_read_sem_seg(png)):
                assert np.array_equal(values, expected)
    dest = tmp_path / "viewing"
    assert main(["export", output, "--format", "semantic", "--dest", str(dest), "--palette", "--no-progress"]) == 0
    sample_id, masks = next(iter(known.items()))
    with Image.open(dest / "ann_dir" / "train" / f"{sample_id.replace('/', '__')}.png") as image:
        assert image.mode == "P" and image.getpalette()[3 * 1:3 * 2] == list(class_color(1))
        assert np.array_equal(np.asarray(image) == 1, masks[1])
    assert main(["export", output, "--format", "semantic", "--dest", str(tmp_path / "bad"),
                 "--background-index", "2"]) == 2
    assert not (tmp_path / "bad").exists()


_DRAW = """
import json, sys
import numpy as np
from ultralytics.data.utils import polygon2mask
out = {}
for index, (name, height, width) in enumerate(json.loads(sys.argv[1])):
    for line_number, line in enumerate(open(name).read().splitlines()):
        values = line.split()
        xy = np.array(values[1:], dtype=float).reshape(-1, 2)
        assert len(xy) >= 3 and xy.min() >= 0 and xy.max() <= 1, line
        mask = polygon2mask((height, width), [(xy * [width, height]).reshape(-1)]).astype(bool)
        out[f"{index}_{line_number}_{values[0]}"] = mask
np.savez_compressed(sys.argv[2], **out)
"""


def yolo_drawn_all(files: list[tuple[Path, tuple[int, int]]], tmp_path: Path) -> list[dict[int, np.ndarray]]:
    """For each label file, class id -> union of its polygons as Ultralytics draws them for
    training: normalised coordinates times the image size, ``ultralytics.data.utils.polygon2mask``.
    In a process of its own: importing Ultralytics patches ``PIL.Image.open`` (and may try to
    install packages) for the whole process."""
    result = tmp_path / "drawn.npz"
    spec = json.dumps([[str(name), int(size[0]), int(size[1])] for name, size in files])
    env = {**os.environ, "YOLO_AUTOINSTALL": "false", "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "false"}
    done = subprocess.run([sys.executable, "-c", _DRAW, spec, str(result)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn: list[dict[int, np.ndarray]] = [{} for _ in files]
    with np.load(result) as masks:
        for key in masks.files:
            index, _, class_id = (int(part) for part in key.split("_"))
            height, width = files[index][1]
            drawn[index][class_id] = drawn[index].get(class_id, np.zeros((height, width), bool)) | masks[key]
    return drawn


def test_yolo_polygons_rasterise_back_to_the_masks(known_output, tmp_path):
    output, known = known_output
    dest = tmp_path / "yolo"
    assert main(["export", output, "--format", "yolo-seg", "--dest", str(dest), "--images", "--no-progress"]) == 0
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CLASSES)) and data["train"] == "images/train"
    assert "val" not in data  # one split is never named as both train and val (issue 19)
    assert data["path"] == str(dest)
    files = []
    for sample_id in known:
        stem = sample_id.replace("/", "__")
        with Image.open(dest / "images" / "train" / f"{stem}.jpg") as image:
            width, height = image.size
        label_file = dest / "labels" / "train" / f"{stem}.txt"
        assert len(label_file.read_text().splitlines()) == 5
        files.append((label_file, (height, width)))
    for drawn, masks in zip(yolo_drawn_all(files, tmp_path), known.values()):
        for class_id, mask in masks.items():  # the ring (class 2) keeps its hole
            assert np.array_equal(drawn[class_id], mask), class_id


def test_yolo_polygons_of_voc_masks_match_them_under_ultralytics_polygon2mask(tmp_path):
    """The VOC val masks (several objects per class, holes, thin parts) exported as YOLO-seg and
    drawn back as Ultralytics trains on them: mean IoU >= 0.97 per image and class (pixel-index
    vertices with filled holes gave 0.913, min 0.434), and no pixel under two classes' polygons."""
    from pipeline.quality.groundtruth import decode_mask_png
    voc = Path(__file__).parent / "data" / "voc-val"
    classes = (voc / "classes.txt").read_text().split()
    images = {}
    for target in sorted(voc.glob("*_target.png")):
        values = decode_mask_png(target.read_bytes(), target.name)
        masks = {int(c): values == c for c in np.unique(values) if c not in (0, 255)}
        with Image.open(voc / target.name.replace("_target", "_image")) as photo:
            images[target.name.split("_")[0]] = (photo.convert("RGB"), masks)
    (tmp_path / "shards").mkdir()
    known = write_masks_output(str(tmp_path / "shards"), str(tmp_path / "out"), images, classes)
    dest = tmp_path / "yolo"
    assert main(["export", str(tmp_path / "out"), "--format", "yolo-seg", "--dest", str(dest), "--no-progress"]) == 0
    ious = []
    files = [(dest / "labels" / "train" / f"{sample_id.replace('/', '__')}.txt", next(iter(masks.values())).shape)
             for sample_id, masks in known.items()]
    for drawn, masks in zip(yolo_drawn_all(files, tmp_path), known.values()):
        assert set(drawn) == set(masks)
        assert not (np.sum(list(drawn.values()), axis=0) > 1).any()  # no hole covers another class
        ious += [(drawn[c] & mask).sum() / (drawn[c] | mask).sum() for c, mask in masks.items()]
    assert len(ious) == 9 and np.mean(ious) >= 0.97 and min(ious) >= 0.999, ious  # measured: all 1.0


def test_polygons_of_blobs():
    mask = np.zeros((200, 300), bool)
    yy, xx = np.mgrid[:200, :300]
    mask |= (xx - 80) ** 2 + (yy - 90) ** 2 < 50 ** 2
    mask |= ((xx - 220) / 60.0) ** 2 + ((yy - 120) / 30.0) ** 2 < 1
    found = components(mask)
    assert [c.area for c in found] == sorted((c.area for c in found), reverse=True) and len(found) == 2
    for component in found:
        outline = polygons(component.mask)
        back = rasterize(outline, mask.shape)
        assert (back & component.mask).sum() / (back | component.mask).sum() > 0.97
        assert component.mask[component.point[1], component.point[0]]


def test_polygons_keep_holes_exactly_however_many():
    """Holes (hundreds, one pixel, side by side, a one-pixel-thick ring, holes hanging from holes
    above them) are bridged, and filling the polygons gives each component back pixel for pixel."""
    import cv2
    rng = np.random.default_rng(0)
    mask = np.ones((300, 400), np.uint8)
    for _ in range(300):
        x, y, r = int(rng.integers(5, 395)), int(rng.integers(5, 295)), int(rng.integers(0, 4))
        cv2.circle(mask, (x, y), r, 0, -1)
    mask[100:140, 100:140] = 0
    cv2.rectangle(mask, (105, 105), (134, 134), 1, 1)  # a one-pixel ring inside a hole: an island
    mask[200:210, 50:60], mask[212:220, 52:58] = 0, 0   # one hole straight under another
    mask[0, :] = 0
    found = components(mask.astype(bool))
    assert len(found) >= 2
    for component in found:
        assert np.array_equal(rasterize(polygons(component.mask), mask.shape), component.mask)


def test_export_refuses_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "coco"]) == 2
    assert "not a gemlabel output" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_export_tasks_run_on_ray_workers_and_a_failed_shard_is_redone_alone(labelled_output, tmp_path):
    """Each shard is a Ray task in a worker process; a shard whose images are gone fails alone,
    the others are committed, and the rerun exports only that shard."""
    import os
    import shutil as sh
    labelset = open_labelset(Location(labelled_output))
    val_shard = next(m["shard"] for m in labelset.markers.values() if "val-" in m["shard"])
    moved = tmp_path / "moved.tar"
    sh.move(val_shard, moved)
    dest = tmp_path / "sem"
    try:
        assert main(["export", labelled_output, "--format", "semantic", "--dest", str(dest), "--images",
                     "--no-progress"]) == 1
    finally:
        sh.move(moved, val_shard)
    done = {p.name: json.loads(p.read_text()) for p in (dest / "_done").iterdir()}
    assert len(done) == 2 and all(r["worker"]["pid"] != os.getpid() for r in done.values())
    summary = run_export(labelset, ExportOptions("semantic", Location(str(dest)), images=True), progress=False)
    assert (summary.shards_done, summary.shards_skipped, summary.shards_failed, summary.images) == (1, 2, 0, 12)
    assert len(list((dest / "img_dir" / "train").iterdir())) == 12


def test_coco_export_to_s3(s3_endpoint, tmp_path):
    import s3fs
    from tests.conftest import S3_CREDENTIALS
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("export-bucket")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    known = write_known_output("s3://export-bucket/shards", "s3://export-bucket/labels", storage_options=options,
                               local_tmp=tmp_path)
    # Ray workers started before this test do not see its environment: credentials go in the options.
    summary = run_export(open_labelset(Location("s3://export-bucket/labels", options)),
                         ExportOptions("coco", Location("s3://export-bucket/labels/exports/coco", options),
                                       instances=True, images=True), progress=False)
    assert (summary.shards_done, summary.images) == (1, 3)
    fs.invalidate_cache()
    fs.get("export-bucket/labels/exports/coco/annotations/train.json", str(tmp_path / "train.json"))
    coco = COCO(str(tmp_path / "train.json"))
    assert {i["sample_id"] for i in coco.dataset["images"]} == set(known)
    for image in coco.dataset["images"]:
        assert fs.exists(f"export-bucket/labels/exports/coco/images/train/{image['file_name']}")
        union = coco_masks(coco, image["id"])
        assert all(np.array_equal(union[c + 1], m) for c, m in known[image["sample_id"]].items())


def test_coco_export_is_strict_json_when_scores_are_nan(tmp_path):
    """An overflowing model's NaN scores become null: `NaN` is not JSON, and strict parsers (a
    browser's, jq, Go's, Java's) refuse the whole file."""
    (tmp_path / "shards").mkdir()
    write_known_output(str(tmp_path / "shards"), str(tmp_path / "out"), nan_scores=True)
    run_export(open_labelset(Location(str(tmp_path / "out"))), ExportOptions("coco", Location(str(tmp_path / "coco"))),
               progress=False)
    coco = strict_json(tmp_path / "coco" / "annotations" / "train.json")
    scores = [a["score"] for a in coco["annotations"]]
    assert scores.count(None) == 3 and all(isinstance(s, float) for s in scores if s is not None)
