"""`gemlabel eval` and `gemlabel calibrate` end to end on real VOC photos and masks: pack, label
(real local Ray cluster, tiny random model), eval, calibrate. The scores of a random model mean
nothing; the plumbing and the arithmetic are checked: labels made from the ground truth score 1.0,
eval's labelling equals label's, calibrate scores a grid point exactly as eval scores a label run
with those thresholds, and the model runs once per image however large the grid."""
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gem import LabelingThresholds, label_image
from gem.torchvision_shim import import_torchvision
from jobs.cli import main
from pipeline.quality.calibrate import Grid, class_scores, compute_similarities, reported_labels, sweep
from pipeline.quality.classmap import build_mapping
from pipeline.config import load_config
from pipeline.store.rle import encode_mask
from pipeline.quality.groundtruth import folder_ground_truth
from pipeline.store.layout import OutputLayout, prepare_output, write_json
from pipeline.store.marker import shard_marker
from pipeline.io.pack import pack_images
from pipeline.worker.decode import decode_sample
from pipeline.driver.plan import build_spec
from pipeline.driver.run import run_labeling
from pipeline.store.schema import table_from_rows
from pipeline.io.storage import Location
from pipeline.worker.labeler import load_segmenter
from tests.models import DATA
from tests.outputs import all_rows

import_torchvision()
from torchmetrics.classification import MulticlassJaccardIndex  # noqa: E402

VOC_VAL = DATA / "voc-val"
CLASSES_FILE = str(VOC_VAL / "classes.txt")
GT_FLAGS = ["--gt-images", str(VOC_VAL), "--classes", CLASSES_FILE, "--image-suffix", "_image",
            "--mask-suffix", "_target"]
# VOC names, two names for person, one name no VOC class has; bicycle, bottle, bus... left unmapped
VOCAB = ["person", "man", "car", "motorbike", "sheep", "cow", "horse", "sky"]
CLASS_MAP = {"person": ["person", "man"], "car": ["car"], "motorbike": ["motorbike"], "sheep": ["sheep"],
             "cow": ["cow"], "horse": ["horse"]}


def ground_truth():
    return folder_ground_truth(str(VOC_VAL), None, CLASSES_FILE, "_image", "_target")


def write_output_from_ground_truth(output: Path, drop: tuple[str, str] = ("", "")) -> None:
    """A gemlabel output (config, Parquet, marker: the real layout) whose labels are the ground
    truth's masks, each class's point inside its mask; ``drop`` = (key, class) leaves one out."""
    gt = ground_truth()
    names = gt.class_names
    source = {"vocab": VOCAB}
    layout = OutputLayout(Location(str(output)))
    prepare_output(layout, "from-gt", source, overwrite=False)
    rows = []
    for sample in gt.samples():
        labels = []
        for value in np.unique(sample.target):
            name = names[value] if value < len(names) else None
            if name not in VOCAB or (sample.key, name) == drop:
                continue
            mask = sample.target == value
            ys, xs = np.nonzero(mask)
            rle = encode_mask(mask)
            labels.append({"class_id": VOCAB.index(name), "name": name, "score": 1.0, "peak_score": 1.0,
                           "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "point_x": int(xs[0]), "point_y": int(ys[0]),
                           "rle_size": rle["size"], "rle_counts": rle["counts"]})
        height, width = sample.target.shape
        rows.append({"sample_id": f"gt/{sample.key}", "key": sample.key, "shard": "gt.tar", "width": width,
                     "height": height, "status": "ok", "error": None, "labels": labels})
    buffer = io.BytesIO()
    pq.write_table(table_from_rows(rows, source), buffer)
    layout.labels_file("gt-0").write_bytes_atomic(buffer.getvalue())
    marker = shard_marker("gt.tar", "gt-0", "from-gt", rows, buffer.getbuffer().nbytes, {},
                          started=datetime.now(timezone.utc), total_s=0.0)
    write_json(layout.marker_file("gt-0"), marker)


def write_class_map(tmp_path: Path) -> str:
    path = tmp_path / "class_map.yaml"
    path.write_text(yaml.safe_dump(CLASS_MAP))
    return str(path)


def test_labels_made_from_the_ground_truth_score_one(tmp_path):
    perfect, holed = tmp_path / "perfect", tmp_path / "holed"
    write_output_from_ground_truth(perfect)
    write_output_from_ground_truth(holed, drop=("582_image", "person"))
    class_map = write_class_map(tmp_path)
    assert main(["eval", *GT_FLAGS, "--labels", str(perfect), "--class-map", class_map,
                 "--report", str(tmp_path / "r1"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["summary"] | {"points": 0} == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0, "fwIoU": 100.0,
                                                 "point_precision": 100.0, "points": 0}
    assert report["images"]["scored"] == 6 and report["summary"]["points"] == 6
    by_class = {row["class"]: row for row in report["classes"]}
    assert set(by_class) == {"background", "person", "car", "motorbike", "sheep", "cow", "horse"}
    assert by_class["sheep"]["IoU"] is None  # in no image: absent from both, not counted
    assert by_class["person"]["vocab"] == ["man", "person"]
    assert report["mapping"]["unmapped_vocab"] == ["sky"] and "bicycle" in report["mapping"]["unmapped_classes"]
    for name in ("report.md", "class_iou.png", "confusion.png"):
        assert (tmp_path / "r1" / name).stat().st_size > 0
    assert "| person | man, person | 100.00 |" in (tmp_path / "r1" / "report.md").read_text()

    # one person region dropped: its pixels become background (no label = background)
    assert main(["eval", *GT_FLAGS, "--labels", str(holed), "--class-map", class_map,
                 "--report", str(tmp_path / "r2"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    targets = {s.key: s.target for s in ground_truth().samples()}
    person_total = sum(int((t == 15).sum()) for t in targets.values())
    person_dropped = int((targets["582_image"] == 15).sum())
    scored_background = sum(int((t == 0).sum()) for t in targets.values())
    by_class = {row["class"]: row for row in report["classes"]}
    assert by_class["person"]["IoU"] == round(100 * (person_total - person_dropped) / person_total, 2)
    assert by_class["background"]["IoU"] == round(100 * scored_background / (scored_background + person_dropped), 2)
    assert by_class["person"]["points"] == 1  # one point fewer


def test_calibration_post_processing_equals_label_image():
    """Calibrate splits label_image in two (once per logit scale, then per threshold); the labels
    and points it scores must be exactly what labelling reports."""
    torch.manual_seed(3)
    for size in [(97, 131), (513, 40)]:
        similarities = torch.randn(6, 7, 9) * 0.05 + torch.linspace(0, 0.02, 6)[:, None, None]
        for scale in (10.0, 100.0):
            scores = class_scores(similarities, size, scale)
            for threshold, area in [(0.0, 1), (0.3, 1), (0.5, 50), (0.6, 400), (0.99, 1)]:
                thresholds = LabelingThresholds(logit_scale=scale, background_threshold=threshold, min_area=area)
                labels, regions = label_image(similarities, size, thresholds)
                reported, points = reported_labels(scores, thresholds)
                kept = [r.class_id for r in regions]
                assert np.array_equal(reported, np.where(np.isin(labels, kept), labels, -1))
                assert points == [(r.point[0], r.point[1], r.class_id) for r in regions]


def label_config(base_config, tmp_path, **extra):
    return {**base_config, "vocab": VOCAB, "output": str(tmp_path / "labels"), **extra}


def config_file(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "output"}))
    return str(path)


def torchmetrics_miou(rows: list[dict], class_map: dict) -> float:
    """Independent: decode the Parquet rows with pycocotools, paint, and let torchmetrics score."""
    from pycocotools import mask as mask_utils
    names = ground_truth().class_names
    vocab_to_index = {v: names.index(c) for c, vs in class_map.items() for v in vs}
    evaluated = set(vocab_to_index.values()) | {0}
    metric = MulticlassJaccardIndex(len(names), average="macro", ignore_index=255)
    by_key = {row["key"]: row for row in rows}
    for sample in ground_truth().samples():
        pred = np.zeros(sample.target.shape, dtype=np.int64)
        for label in by_key[sample.key]["labels"]:
            mask = mask_utils.decode({"size": label["rle_size"], "counts": label["rle_counts"].encode()}).astype(bool)
            pred[mask] = vocab_to_index.get(label["name"], 0)
        target = np.where(np.isin(sample.target, list(evaluated)), sample.target, 255).astype(np.int64)
        metric.update(torch.from_numpy(pred).flatten(), torch.from_numpy(target).flatten())
    return float(metric.compute())


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.usefixtures("ray_session")
def test_pack_label_eval_calibrate(base_config, tmp_path, capsys):
    class_map = write_class_map(tmp_path)
    # pack + label, as a user would, then eval the output
    shards = pack_images(str(VOC_VAL), Location(str(tmp_path / "shards" / "voc")), pattern="*_image.png").shards
    config = load_config(None, {**label_config(base_config, tmp_path), "input": shards})
    assert run_labeling(config).images == 6
    assert main(["eval", *GT_FLAGS, "--labels", config.output, "--class-map", class_map,
                 "--report", str(tmp_path / "scored"), "--no-progress"]) == 0
    scored = json.loads((tmp_path / "scored" / "report.json").read_text())
    assert scored["images"]["scored"] == 6
    printed = capsys.readouterr()  # results on stdout, as label's summary; progress alone on stderr
    assert f"gemlabel eval: 6 images, mIoU {scored['summary']['mIoU']}" in printed.out and "mIoU" not in printed.err
    assert scored["summary"]["mIoU"] == round(100 * torchmetrics_miou(all_rows(config.output), CLASS_MAP), 2)

    # eval labelling by itself with the same config: the same labels, the same scores
    cfg = config_file(tmp_path, label_config(base_config, tmp_path))
    assert main(["eval", *GT_FLAGS, "--config", cfg, "--class-map", class_map,
                 "--report", str(tmp_path / "self"), "--no-progress"]) == 0
    itself = json.loads((tmp_path / "self" / "report.json").read_text())
    assert itself["labels"] == str(tmp_path / "self" / "labels") and itself["labelling_seconds"] > 0
    assert itself["summary"] == scored["summary"] and itself["classes"] == scored["classes"]

    # calibrate, through the library: the model runs once per image, whatever the grid size
    gt = ground_truth()
    spec = build_spec(config)
    mapping = build_mapping(gt.class_names, spec.class_names, CLASS_MAP)
    segmenter = load_segmenter(spec, torch.device("cpu"))
    forwards = []
    segmenter.tower.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    mine = ["a photo of the {}.", "a picture of a {}."]
    vocabularies = {"single": segmenter.vocabulary(spec.class_names, spec.templates),
                    "mine": segmenter.vocabulary(spec.class_names, mine)}
    assert segmenter.text.encoded_prompts == len(VOCAB) * 3  # one text encoding per template set
    cached = compute_similarities(gt, segmenter, vocabularies, mapping, tuple(config.input_size), batch_size=4,
                                  progress=False)
    grid = Grid([25.0, 100.0], [0.0, 0.3, 0.6], [1, 2000])
    calibration = sweep(cached, mapping, grid, progress=False, templates="single")
    other = sweep(cached, mapping, grid, progress=False, templates="mine")
    assert forwards == [4, 2] and len(calibration.points) == len(other.points) == 12  # 6 images, one pass
    first = next(ground_truth().samples())
    decoded = decode_sample(0, first.raw(), tuple(config.input_size), segmenter.mean, segmenter.std)
    alone = segmenter.patch_similarities(decoded.tensor[None], vocabularies["mine"])  # one set alone: the same
    torch.testing.assert_close(cached[0].similarities["mine"], alone[0].cpu())
    # the grid point with the label run's thresholds scores what eval scored for that run
    default = next(p for p in calibration.points if (p["logit_scale"], p["background_threshold"], p["min_area"])
                   == (100.0, 0.0, 1))
    assert 100 * default["mIoU"] == pytest.approx(scored["summary"]["mIoU"], abs=0.01)
    assert 100 * default["aAcc"] == pytest.approx(scored["summary"]["aAcc"], abs=0.01)

    # calibrate through the command: the YAML fragment is a config label accepts
    report = tmp_path / "calibration"
    assert main(["calibrate", *GT_FLAGS, "--config", cfg, "--class-map", class_map, "--report", str(report),
                 "--grid-logit-scale", "25,100", "--grid-background-threshold", "0,0.3,0.6",
                 "--grid-min-area", "1,2000", "--compare-templates", "single,imagenet80", "--no-progress"]) == 0
    record = json.loads((report / "calibration.json").read_text())
    assert set(record["template_sets"]) == {"single", "imagenet80"}
    assert [(p["logit_scale"], p["background_threshold"], p["min_area"], p["mIoU"])
            for p in record["template_sets"]["single"]["points"]] == \
        [(p["logit_scale"], p["background_threshold"], p["min_area"], p["mIoU"]) for p in calibration.points]
    best_set = max(record["template_sets"].values(), key=lambda s: s["best_mIoU"])
    best = max(best_set["points"], key=lambda p: p["mIoU"])
    assert record["best"]["mIoU"] == best["mIoU"]
    merged = load_config(str(report / "best.yaml"), {**label_config(base_config, tmp_path), "input": shards})
    assert {"logit_scale": merged.thresholds.logit_scale, "background_threshold": merged.thresholds.background_threshold,
            "min_area": merged.thresholds.min_area} == {k: best[k] for k in ("logit_scale", "background_threshold",
                                                                            "min_area")}
    assert merged.gem.depth == 3 and merged.vocab == VOCAB
    assert merged.templates == record["best"]["templates"]  # the compared sets' best goes in the fragment too
    assert (report / "calibration.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "gemlabel calibrate: best of 24 settings on 6 images" in printed.out and "mIoU" not in printed.err

    # best.yaml alone (with where to read and write) labels what calibrate scored best
    relabelled, rescored = tmp_path / "relabelled", tmp_path / "rescored"
    assert main(["label", "--config", str(report / "best.yaml"), "--input", *shards, "--output", str(relabelled)]) == 0
    assert main(["eval", *GT_FLAGS, "--labels", str(relabelled), "--class-map", class_map,
                 "--report", str(rescored), "--no-progress"]) == 0
    rescored_summary = json.loads((rescored / "report.json").read_text())["summary"]
    assert rescored_summary["mIoU"] == pytest.approx(100 * record["best"]["mIoU"], abs=0.01)
    assert rescored_summary["aAcc"] == pytest.approx(100 * record["best"]["aAcc"], abs=0.01)
    written = yaml.safe_load((report / "best.yaml").read_text())
    assert written["model"] == "gemtest-micro" and "input" not in written and "output" not in written


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    write_output_from_ground_truth(tmp_path / "labels")
    cases = [
        ([*GT_FLAGS[:2], "--labels", str(tmp_path / "labels")], "--classes: give the class list file"),
        ([*GT_FLAGS[:2], "--classes", str(tmp_path / "none.txt"), "--labels", str(tmp_path / "labels")],
         "class list file not found"),
        ([*GT_FLAGS, "--labels", str(tmp_path / "nothing-here")], "not a gemlabel output"),
        ([*GT_FLAGS, "--labels", str(tmp_path / "labels"), "--class-map", write_class_map(tmp_path),
          "--unmapped", "background", "--background-class", "none"], "needs a background class"),
        ([*GT_FLAGS, "--vocab", "person", "--model", "NoSuchModel-B-16", "--pretrained", "none"], "model:"),
        (["--coco", str(tmp_path / "missing.json"), "--gt-images", str(VOC_VAL), "--labels", str(tmp_path / "labels")],
         "COCO annotation file not found"),
    ]
    for flags, message in cases:
        report = tmp_path / "report"
        assert main(["eval", *flags, "--report", str(report)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not report.exists()
    assert main(["calibrate", *GT_FLAGS, "--vocab", "person", "--report", str(tmp_path / "report"),
                 "--grid-background-threshold", "0,1.5"]) == 2
    assert "thresholds.background_threshold: must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["calibrate", *GT_FLAGS, "--vocab", "person", "--report", str(tmp_path / "report"),
                 "--compare-templates", "single,no-such-set"]) == 2
    assert "--compare-templates: templates: 'no-such-set' is neither" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_eval_scores_labels_on_s3(tmp_path, s3_endpoint, monkeypatch):
    import s3fs
    from tests.conftest import S3_CREDENTIALS
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret"])
    write_output_from_ground_truth(tmp_path / "labels", drop=("294_image", "car"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("quality-labels")
    fs.put(str(tmp_path / "labels"), "quality-labels/v1", recursive=True)
    assert main(["eval", *GT_FLAGS, "--labels", "s3://quality-labels/v1", "--s3-endpoint", s3_endpoint,
                 "--class-map", write_class_map(tmp_path), "--report", str(tmp_path / "r"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    by_class = {row["class"]: row for row in report["classes"]}
    assert by_class["car"]["IoU"] == 0.0 and by_class["person"]["IoU"] == 100.0  # the one car dropped
    assert report["labels"] == "s3://quality-labels/v1" and report["images"]["scored"] == 6
