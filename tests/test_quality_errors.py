"""eval and calibrate on unreadable ground truth, a --report that cannot be a folder, and grids
that cannot be written (issue 18.12): one line naming the file and what is wrong, exit 2, nothing
written; checked before any work. Real files (VOC crops, PNG masks, COCO JSON)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from tests.test_quality import GT_FLAGS, VOC_VAL, write_output_from_ground_truth


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def labels(tmp_path) -> str:
    write_output_from_ground_truth(tmp_path / "labels")
    return str(tmp_path / "labels")


def test_report_that_is_a_file_is_refused_before_any_work(labels, tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text("mine")
    assert main(["eval", *GT_FLAGS, "--labels", labels, "--report", str(report), "--no-progress"]) == 2
    assert "--report" in one_line(capsys) and report.read_text() == "mine"
    assert main(["eval", *GT_FLAGS, "--labels", labels, "--report", str(report / "sub"), "--no-progress"]) == 2
    assert "is a file, not a folder" in one_line(capsys)
    assert main(["calibrate", *GT_FLAGS, "--vocab", "person", "--report", str(report)]) == 2
    assert "--report" in one_line(capsys) and report.read_text() == "mine"


@pytest.mark.parametrize("value", ["inf", "nan", "25,-inf"])
def test_calibrate_grid_of_non_finite_values_is_refused(tmp_path, capsys, value):
    assert main(["calibrate", *GT_FLAGS, "--vocab", "person", "--report", str(tmp_path / "r"),
                 "--grid-logit-scale", value]) == 2
    assert "--grid-logit-scale: values must be finite" in one_line(capsys)
    assert not (tmp_path / "r").exists()


def folder_flags(folder: Path) -> list[str]:
    return ["--gt-images", str(folder), "--classes", str(folder / "classes.txt"), "--image-suffix", "_image",
            "--mask-suffix", "_target"]


@pytest.mark.parametrize("damage, message", [
    ("corrupt", "120_target.png: not a readable image"),
    ("truncated", "120_target.png: not a readable image"),
    ("latin1", "not UTF-8 text"),
    ("classes-folder", "is a folder, not a file"),
])
def test_unreadable_folder_ground_truth(labels, tmp_path, capsys, damage, message):
    gt = tmp_path / "gt"
    shutil.copytree(VOC_VAL, gt)
    mask = gt / "120_target.png"
    if damage == "corrupt":
        mask.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    elif damage == "truncated":
        mask.write_bytes(mask.read_bytes()[:200])
    elif damage == "latin1":
        (gt / "classes.txt").write_bytes((gt / "classes.txt").read_bytes() + "caf\xe9\n".encode("latin-1"))
    else:
        (gt / "classes.txt").unlink()
        (gt / "classes.txt").mkdir()
    report = tmp_path / "report"
    assert main(["eval", *folder_flags(gt), "--labels", labels, "--report", str(report), "--no-progress"]) == 2
    assert message in one_line(capsys)
    assert not report.exists()


@pytest.mark.parametrize("damage, message", [("folder", "is a folder"), ("latin1", "not UTF-8")])
def test_unreadable_class_map(labels, tmp_path, capsys, damage, message):
    class_map = tmp_path / "map.yaml"
    if damage == "folder":
        class_map.mkdir()
    else:
        class_map.write_bytes("person: [caf\xe9]\n".encode("latin-1"))
    assert main(["eval", *GT_FLAGS, "--labels", labels, "--class-map", str(class_map), "--report",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    err = one_line(capsys)
    assert message in err and str(class_map) in err
    assert not (tmp_path / "r").exists()


def coco_file() -> dict:
    return {"images": [{"id": 1, "file_name": "120_image.png", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4,
                             "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "person"}]}


def _no_name(d): del d["categories"][0]["name"]
def _no_file_name(d): del d["images"][0]["file_name"]
def _unknown_category(d): d["annotations"][0]["category_id"] = 7
def _images_dict(d): d["images"] = {"1": d["images"][0]}
def _string_segmentation(d): d["annotations"][0]["segmentation"] = "1 1 3 3"


@pytest.mark.parametrize("damage, message", [
    (_no_name, "categories[0] has no 'name'"), (_no_file_name, "images[0] has no 'file_name'"),
    (_unknown_category, "category_id 7, which no category has"), (_images_dict, "'images' must be a list"),
    (_string_segmentation, "segmentation must be polygons"), (None, "is a folder"),
])
def test_malformed_coco_ground_truth(labels, tmp_path, capsys, damage, message):
    annotations = tmp_path / "instances.json"
    if damage is None:
        annotations.mkdir()
    else:
        data = coco_file()
        damage(data)
        annotations.write_text(json.dumps(data))
    assert main(["eval", "--coco", str(annotations), "--gt-images", str(VOC_VAL), "--labels", labels,
                 "--report", str(tmp_path / "r"), "--no-progress"]) == 2
    err = one_line(capsys)
    assert message in err and str(annotations) in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("address, message", [("127.0.0.1:{port}", "nothing answers"),
                                              ("not an address", "expected HOST:PORT")])
def test_eval_with_an_unreachable_ray_address_fails_before_any_work(base_config, tmp_path, capsys, address,
                                                                    message):
    """eval labels on the cluster at --ray-address: one that does not answer was found only after
    the ground truth had been packed into shards under --report."""
    from tests.conftest import free_port
    from tests.test_quality import config_file, label_config
    config = config_file(tmp_path, label_config(base_config, tmp_path))
    report = tmp_path / "report"
    assert main(["eval", *GT_FLAGS, "--config", config, "--report", str(report), "--no-progress",
                 "--ray-address", address.format(port=free_port())]) == 2
    assert message in one_line(capsys)
    assert not report.exists()


def test_a_mask_of_another_size_than_its_image_is_refused_before_labelling(base_config, tmp_path, capsys):
    """eval that labels: the mismatch was found only when scoring, after every image was labelled."""
    from PIL import Image

    from tests.test_quality import config_file, label_config
    gt = tmp_path / "gt"
    shutil.copytree(VOC_VAL, gt)
    mask = gt / "120_target.png"
    with Image.open(mask) as original:
        original.resize((original.width // 2, original.height)).save(mask)
    config = config_file(tmp_path, label_config(base_config, tmp_path))
    report = tmp_path / "report"
    assert main(["eval", *folder_flags(gt), "--config", config, "--report", str(report), "--no-progress"]) == 2
    err = one_line(capsys)
    assert "120_image" in err and "but its mask" in err and "120_target.png" in err, err
    assert not report.exists()
