"""Ground truth in its three layouts, all built from the same real VOC photos and masks: each layout
must give back the VOC masks' class indices exactly."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.quality.classmap import build_mapping
from pipeline.store.rle import encode_mask
from pipeline.quality.groundtruth import GroundTruthError, coco_ground_truth, decode_mask_png, folder_ground_truth, read_class_list, shard_ground_truth, voc_palette
from pipeline.quality.metrics import IGNORE_INDEX
from pipeline.io.pack import pack_images
from pipeline.io.tar import iter_tar_samples
from pipeline.io.storage import Location
from tests.models import DATA
from tests.shards import encode, write_shard

VOC_VAL = DATA / "voc-val"
CLASSES = read_class_list(Location(str(VOC_VAL / "classes.txt")))
TARGETS = sorted(VOC_VAL.glob("*_target.png"))


def voc_indices(path: Path) -> np.ndarray:
    """The VOC target's indices by direct colour lookup of the dataset's documented colours."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    known = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2, (128, 128, 0): 3, (128, 0, 128): 5, (0, 128, 128): 6,
             (128, 128, 128): 7, (192, 0, 128): 13, (64, 128, 128): 14, (192, 128, 128): 15, (128, 64, 0): 17,
             (64, 128, 0): 10, (64, 0, 128): 12, (224, 224, 192): IGNORE_INDEX}
    out = np.full(rgb.shape[:2], 254, dtype=np.uint8)
    for colour, index in known.items():
        out[(rgb == colour).all(axis=-1)] = index
    assert (out != 254).all(), "a colour outside the table"
    return out


def palette_png(indices: np.ndarray) -> bytes:
    image = Image.fromarray(indices, mode="P")
    image.putpalette(voc_palette().flatten().tolist())
    return encode(image, "PNG")


def test_voc_rgb_palette_and_index_masks_read_alike():
    for path in TARGETS:
        expected = voc_indices(path)
        assert np.array_equal(decode_mask_png(path.read_bytes(), path.name), expected)
        assert np.array_equal(decode_mask_png(palette_png(expected), "p.png"), expected)  # mode P: its indices
        assert np.array_equal(decode_mask_png(encode(Image.fromarray(expected), "PNG"), "l.png"), expected)
    odd = np.zeros((4, 4, 3), dtype=np.uint8)
    odd[0, 0] = (1, 2, 3)
    with pytest.raises(GroundTruthError, match=r"colour \(1, 2, 3\) is not in the VOC palette"):
        decode_mask_png(encode(Image.fromarray(odd), "PNG"), "odd.png")


def test_folder_layout_keys_match_packed_images(tmp_path):
    gt = folder_ground_truth(str(VOC_VAL), None, str(VOC_VAL / "classes.txt"), "_image", "_target")
    samples = list(gt.samples())
    assert gt.count == len(samples) == 6 and gt.class_names == CLASSES
    shards = pack_images(str(VOC_VAL), Location(str(tmp_path / "packed")), pattern="*_image.png").shards
    packed = [raw["__key__"] for raw in iter_tar_samples(Location(shards[0]))]
    assert [s.key for s in samples] == packed  # labels and masks meet by these keys
    for sample in samples:
        target_path = VOC_VAL / f"{sample.key.removesuffix('_image')}_target.png"
        assert np.array_equal(sample.target, voc_indices(target_path))
        assert Image.open(io.BytesIO(sample.image)).size == sample.target.shape[::-1]
    with pytest.raises(GroundTruthError, match="no mask for image"):
        folder_ground_truth(str(VOC_VAL), None, str(VOC_VAL / "classes.txt"), "_image", "_mask")
    (tmp_path / "few.txt").write_text("background\naeroplane\n")
    with pytest.raises(GroundTruthError, match="class list has 2 classes"):
        list(folder_ground_truth(str(VOC_VAL), None, str(tmp_path / "few.txt"), "_image", "_target").samples())


def _coco_images(tmp_path: Path) -> tuple[Path, list[dict], list[np.ndarray]]:
    images, infos, targets = tmp_path / "images", [], []
    images.mkdir()
    for i, path in enumerate(TARGETS):
        name = path.name.replace("_target", "")
        (images / name).write_bytes((VOC_VAL / path.name.replace("_target", "_image")).read_bytes())
        target = voc_indices(path)
        infos.append({"id": i + 1, "file_name": name, "height": target.shape[0], "width": target.shape[1]})
        targets.append(target)
    return images, infos, targets


CATEGORIES = [{"id": i, "name": name, "isthing": 1} for i, name in enumerate(CLASSES) if i > 0]


def test_coco_instances_become_semantic_maps(tmp_path):
    images, infos, targets = _coco_images(tmp_path)
    annotations = []
    for info, target in zip(infos, targets):
        for value in np.unique(target):
            if value == 0:
                continue
            rle = encode_mask(target == value)
            annotations.append({"id": len(annotations) + 1, "image_id": info["id"], "iscrowd": int(value == 255),
                                "category_id": 1 if value == 255 else int(value), "area": int((target == value).sum()),
                                "segmentation": rle, "bbox": [0, 0, 1, 1]})
    # a polygon too: a square of "bird" in the first image's top-left corner
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "iscrowd": 0, "category_id": 3, "area": 100,
                        "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "bbox": [0, 0, 10, 10]})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": infos, "annotations": annotations, "categories": CATEGORIES}))
    gt = coco_ground_truth(str(path), str(images))
    assert gt.class_names == CLASSES  # background, then the categories in id order
    samples = list(gt.samples())
    assert [s.key for s in samples] == [Path(i["file_name"]).stem for i in infos]
    for k, (sample, target) in enumerate(zip(samples, targets)):
        expected = target.copy()
        if k == 0:
            polygon = np.zeros_like(target, dtype=bool)
            polygon[:11, :11] = True  # pycocotools rasterises the closed square's border pixels too
            painted = sample.target == 3
            assert painted.sum() >= 100 and painted[:11, :11].sum() == painted.sum()
            expected[painted] = 3
            expected[(target == 255) & polygon] = 255  # crowd (void) stays ignored on top
        assert np.array_equal(sample.target, expected)


def test_coco_panoptic_becomes_semantic_maps(tmp_path):
    images, infos, targets = _coco_images(tmp_path)
    pngs = tmp_path / "panoptic_val"
    pngs.mkdir()
    annotations = []
    for info, target in zip(infos, targets):
        ids = np.zeros(target.shape, dtype=np.int64)  # 0 = VOID
        segments = []
        for value in np.unique(target):
            if value == 255:
                continue
            segment_id = 1000 + 37 * int(value) + 70000 * info["id"]  # uses all three channels
            ids[target == value] = segment_id
            if value == 0:  # background as a crowd segment of "person": ignored
                segments.append({"id": segment_id, "category_id": 15, "iscrowd": 1})
            else:
                segments.append({"id": segment_id, "category_id": int(value), "iscrowd": 0})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        name = f"{Path(info['file_name']).stem}.png"
        Image.fromarray(rgb).save(pngs / name)
        annotations.append({"image_id": info["id"], "file_name": name, "segments_info": segments})
    path = tmp_path / "panoptic_val.json"
    path.write_text(json.dumps({"images": infos, "annotations": annotations, "categories": CATEGORIES}))
    samples = list(coco_ground_truth(str(path), str(images)).samples())  # PNGs found beside the JSON
    for sample, target in zip(samples, targets):
        expected = np.where(target == 0, IGNORE_INDEX, target)
        assert np.array_equal(sample.target, expected)


def test_shards_with_masks_beside_images(tmp_path):
    samples = []
    for path in TARGETS:
        stem = path.name.replace("_target.png", "")
        image = Image.open(VOC_VAL / f"{stem}_image.png").convert("RGB")
        samples.append({"__key__": f"voc-{stem}", "jpg": encode(image, "JPEG"), "seg.png": palette_png(voc_indices(path))})
    write_shard(tmp_path / "gt-0.tar", samples[:3])
    write_shard(tmp_path / "gt-1.tar", samples[3:])
    gt = shard_ground_truth([Location(str(tmp_path / "gt-{0..1}.tar"))], Location(str(VOC_VAL / "classes.txt")))
    assert gt.shards == [str(tmp_path / "gt-0.tar"), str(tmp_path / "gt-1.tar")]
    read = list(gt.samples())
    assert [s.key for s in read] == [s["__key__"] for s in samples]
    for sample, path in zip(read, TARGETS):
        assert sample.image_ext == "jpg" and np.array_equal(sample.target, voc_indices(path))
    write_shard(tmp_path / "nomask.tar", [{"__key__": "a", "jpg": samples[0]["jpg"]}])
    with pytest.raises(GroundTruthError, match="has no seg.png"):
        list(shard_ground_truth([Location(str(tmp_path / "nomask.tar"))],
                                Location(str(VOC_VAL / "classes.txt"))).samples())


def test_class_mapping_many_names_to_one_class_and_unmapped_classes():
    vocab = ["person", "man", "car", "sky"]
    mapping = build_mapping(CLASSES, vocab, {"person": ["person", "man"], "car": "car".split()}, "ignore")
    assert mapping.class_of("man") == mapping.class_of("person") == 15 and mapping.class_of("car") == 7
    assert mapping.class_of("sky") == 0 == mapping.no_class  # mapped to no class: background
    assert mapping.evaluated == [0, 7, 15]
    lookup = mapping.ground_truth_lookup()
    assert (lookup[0], lookup[7], lookup[15], lookup[3], lookup[255]) == (0, 7, 15, 255, 255)
    as_background = build_mapping(CLASSES, vocab, {"person": ["person", "man"]}, "background")
    assert as_background.ground_truth_lookup()[7] == 0  # car is unmapped here: background
    no_background = build_mapping(CLASSES, ["person"], None, "ignore", background=None)
    assert no_background.no_class == len(CLASSES) and no_background.evaluated == [15]
    assert no_background.ground_truth_lookup()[0] == 255
    with pytest.raises(GroundTruthError, match="'pedestrian' is not in the vocabulary"):
        build_mapping(CLASSES, vocab, {"person": ["pedestrian"]})
    with pytest.raises(GroundTruthError, match="'people' is not a ground-truth class"):
        build_mapping(CLASSES, vocab, {"people": ["person"]})
    with pytest.raises(GroundTruthError, match="no vocabulary entry maps"):
        build_mapping(CLASSES, ["sky"])
    with pytest.raises(GroundTruthError, match="needs a background class"):
        build_mapping(CLASSES, ["person"], None, "background", background=None)
