"""Ground truth for ``gemlabel eval`` / ``calibrate``: images with semantic masks, three layouts.

1. ``folder``: images + index or palette PNG masks (VOC / mmseg style) + a class list file; 255 is
   ignore. Palette PNGs (mode P) are read as their indices; RGB masks in the VOC colour palette are
   mapped back to indices ((224, 224, 192), VOC's void colour, is 255).
2. ``coco``: a COCO JSON, instances (polygons / RLE via pycocotools' annToMask; crowd regions are
   ignored; pixels no annotation covers are class 0, ``background``) or panoptic (the PNG's segment
   ids through ``segments_info``; VOID and crowd are ignored).
3. ``shards``: webdataset shards with a mask beside each image (``key.jpg`` + ``key.seg.png``) and
   a class list file, so eval labels them on a cluster as ``label`` does.

Every sample comes with the image's bytes (decoded later exactly as labelling decodes them) and its
key, the same key ``gemlabel pack`` gives the image, so labels and ground truth meet by key.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from pipeline.quality.metrics import IGNORE_INDEX
from pipeline.io.image_header import displayed_size
from pipeline.io.pack import sample_keys
from pipeline.io.tar import IMAGE_EXTENSIONS, MASK_ENTRY, iter_tar_samples
from pipeline.io.shards import list_shards
from pipeline.io.storage import Location
from pipeline.io.text_file import TextFileError, read_text

VOC_VOID_COLOUR = (224, 224, 192)
COCO_BACKGROUND = "background"


class GroundTruthError(ValueError):
    """The ground truth cannot be read as given; the message says what to fix."""


@dataclass
class GroundTruthSample:
    key: str
    image: bytes
    image_ext: str                # jpg, png, ...: how reader.decode_sample finds it
    target: np.ndarray            # (H, W) uint8 class indices, 255 = ignore
    shard: Optional[str] = None   # the shard URL and the sample's name in it (``__uid__``), for
    uid: Optional[str] = None     # ground truth in shards: their keys may repeat across shards

    def raw(self) -> dict:
        """As a webdataset sample, for pipeline.worker.decode.decode_sample."""
        return {"__key__": self.key, self.image_ext: self.image}


@dataclass
class GroundTruth:
    class_names: list[str]
    samples: Callable[[], Iterator[GroundTruthSample]]  # a fresh iterator on each call
    shards: list[str] = field(default_factory=list)     # set when the images already are in shards
    count: Optional[int] = None                         # number of samples, when known up front


def voc_palette(entries: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (entries, 3) uint8, index i -> its colour (bit-interleaved)."""
    palette = np.zeros((entries, 3), dtype=np.uint8)
    for index in range(entries):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    return palette


def _voc_colour_lookup() -> dict[int, int]:
    packed = voc_palette(IGNORE_INDEX).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    lookup = {int(code): index for index, code in enumerate(packed)}
    r, g, b = VOC_VOID_COLOUR
    lookup[(r << 16) | (g << 8) | b] = IGNORE_INDEX
    return lookup


def decode_mask_png(data: bytes, name: str) -> np.ndarray:
    """Index PNG (L / P) -> its values; RGB in the VOC palette -> the palette's indices."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # corrupt, truncated
        raise GroundTruthError(f"mask {name}: not a readable image ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else 'unreadable'})") from None
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I", "I;16"):
        values = np.asarray(image)
        if values.max() > IGNORE_INDEX:
            raise GroundTruthError(f"mask {name}: values up to {values.max()}, masks hold class indices 0..255")
        return values.astype(np.uint8)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    codes, inverse = np.unique(packed, return_inverse=True)
    lookup = _voc_colour_lookup()
    unknown = [code for code in codes if int(code) not in lookup]
    if unknown:
        colour = tuple((int(unknown[0]) >> s) & 255 for s in (16, 8, 0))
        raise GroundTruthError(f"mask {name}: colour {colour} is not in the VOC palette; "
                               "give index (mode L / P) masks or VOC-palette RGB ones")
    return np.array([lookup[int(c)] for c in codes], dtype=np.uint8)[inverse].reshape(packed.shape)


def read_class_list(source: Location) -> list[str]:
    """One class name a line; line i is class index i (blank lines and # comments skipped)."""
    path = source.url
    try:
        text = read_text(source, "class list file", "a text file, one class name a line")
    except TextFileError as err:
        raise GroundTruthError(str(err)) from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise GroundTruthError(f"class list {path} is empty")
    if len(names) >= IGNORE_INDEX:
        raise GroundTruthError(f"class list {path}: {len(names)} classes; at most {IGNORE_INDEX - 1}")
    return names


def _check_indices(target: np.ndarray, classes: list[str], name: str) -> np.ndarray:
    beyond = target[(target != IGNORE_INDEX) & (target >= len(classes))]
    if beyond.size:
        raise GroundTruthError(f"mask {name} holds class index {int(beyond.max())}, but the class list has "
                               f"{len(classes)} classes (0..{len(classes) - 1}, 255 = ignore)")
    return target


def _pack_keys(paths: list[Path], root: Path) -> dict[Path, str]:
    """The keys ``gemlabel pack`` gives these files when it packs them (in sorted order), so
    labels and masks meet by key."""
    ordered = sorted(set(paths))
    return dict(zip(ordered, sample_keys(ordered, root)))


def _check_sizes(image: Path, mask: Path) -> None:
    """The image (as labelled: EXIF orientation applied) and its mask have one size; read from
    the files' headers, so a few hundred pairs cost well under a second."""
    try:
        with Image.open(image) as picture:
            width, height = displayed_size(picture)
        with Image.open(mask) as target:
            mask_size = target.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return  # unreadable: said with the file's name where it is decoded
    if (width, height) != mask_size:
        raise GroundTruthError(f"{image}: the image is {width}x{height} but its mask {mask} is "
                               f"{mask_size[0]}x{mask_size[1]}")


def folder_ground_truth(images: str, masks: Optional[str], classes_file: str, image_suffix: str = "",
                        mask_suffix: str = "") -> GroundTruth:
    """Images under ``images`` (any depth); each one's mask is ``masks/<same relative path, stem
    without image_suffix, plus mask_suffix>.png``. E.g. VOC: JPEGImages/x.jpg + SegmentationClass/x.png;
    the crops in tests/data: x_image.png + x_target.png (image_suffix _image, mask_suffix _target)."""
    image_root, mask_root = Path(images), Path(masks or images)
    if not image_root.is_dir():
        raise GroundTruthError(f"images folder not found: {images}")
    classes = read_class_list(Location(classes_file))
    pairs = []
    for path in sorted(p for p in image_root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
        stem = path.stem
        if image_suffix:
            if not stem.endswith(image_suffix):
                continue
            stem = stem[: -len(image_suffix)]
        mask = mask_root / path.relative_to(image_root).parent / f"{stem}{mask_suffix}.png"
        if mask.resolve() == path.resolve():
            continue  # a mask in the images folder
        if not mask.is_file():
            raise GroundTruthError(f"no mask for image {path}: expected {mask}")
        pairs.append((path, mask))
    if not pairs:
        raise GroundTruthError(f"no images with masks under {images} (masks: {mask_root}, "
                               f"image suffix {image_suffix!r}, mask suffix {mask_suffix!r})")

    for path, mask in pairs:  # before anything is labelled: a size mismatch would only show after
        _check_sizes(path, mask)
    keys = _pack_keys([path for path, _ in pairs], image_root)

    def samples() -> Iterator[GroundTruthSample]:
        for path, mask in pairs:
            target = _check_indices(decode_mask_png(mask.read_bytes(), str(mask)), classes, str(mask))
            yield GroundTruthSample(keys[path], path.read_bytes(),
                                    path.suffix.lower().lstrip("."), target)

    return GroundTruth(classes, samples, count=len(pairs))


def _entries(data: dict, name: str, required: dict[str, tuple], file: str) -> list[dict]:
    """data[name] as a list of objects each with the required fields of the required types."""
    items = data[name]
    if not isinstance(items, list):
        raise GroundTruthError(f"{file}: '{name}' must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise GroundTruthError(f"{file}: {name}[{i}] must be an object, got {type(item).__name__}")
        for field_name, types in required.items():
            if field_name not in item:
                raise GroundTruthError(f"{file}: {name}[{i}] has no '{field_name}'")
            if not isinstance(item[field_name], types) or isinstance(item[field_name], bool):
                raise GroundTruthError(f"{file}: {name}[{i}].{field_name} must be "
                                       f"{' or '.join(t.__name__ for t in types)}, got {item[field_name]!r:.60}")
    return items


def check_coco(data: dict, file: str) -> None:
    """What the reading below relies on, checked up front: one line naming the entry at fault."""
    categories = _entries(data, "categories", {"id": (int,), "name": (str,)}, file)
    _entries(data, "images", {"id": (int, str), "file_name": (str,), "width": (int,), "height": (int,)}, file)
    ids = {c["id"] for c in categories}
    panoptic = bool(data["annotations"]) and isinstance(data["annotations"], list) and \
        isinstance(data["annotations"][0], dict) and "segments_info" in data["annotations"][0]
    if panoptic:
        for i, ann in enumerate(_entries(data, "annotations", {"image_id": (int, str), "file_name": (str,),
                                                               "segments_info": (list,)}, file)):
            for segment in ann["segments_info"]:
                if not isinstance(segment, dict) or segment.get("category_id") not in ids or "id" not in segment:
                    raise GroundTruthError(f"{file}: annotations[{i}].segments_info has an entry without an id "
                                           f"or with an unknown category_id: {segment!r:.80}")
        return
    for i, ann in enumerate(_entries(data, "annotations", {"image_id": (int, str), "category_id": (int,)}, file)):
        if ann["category_id"] not in ids:
            raise GroundTruthError(f"{file}: annotations[{i}] has category_id {ann['category_id']}, "
                                   f"which no category has")
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, (list, dict)):
            raise GroundTruthError(f"{file}: annotations[{i}].segmentation must be polygons (a list) or RLE "
                                   f"(an object), got {type(segmentation).__name__}")
        if isinstance(segmentation, dict) and not {"size", "counts"} <= set(segmentation):
            raise GroundTruthError(f"{file}: annotations[{i}].segmentation RLE needs 'size' and 'counts'")


def coco_ground_truth(annotations: str, images: str, panoptic_masks: Optional[str] = None) -> GroundTruth:
    """COCO instances or panoptic JSON -> semantic maps; class 0 is ``background``, then the
    categories in id order."""
    try:
        data = json.loads(read_text(annotations, "COCO annotation file", "a JSON file"))
    except TextFileError as err:
        raise GroundTruthError(str(err)) from None
    except json.JSONDecodeError as err:
        raise GroundTruthError(f"COCO annotation file {annotations} is not JSON: {err}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise GroundTruthError(f"{annotations}: not a COCO file (needs images, annotations, categories)")
    check_coco(data, annotations)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if len(categories) + 1 >= IGNORE_INDEX:
        raise GroundTruthError(f"{annotations}: {len(categories)} categories; at most {IGNORE_INDEX - 2}")
    classes = [COCO_BACKGROUND] + [c["name"] for c in categories]
    index_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    image_root = Path(images)
    panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
    if panoptic:
        png_root = Path(panoptic_masks) if panoptic_masks else Path(annotations).with_suffix("")
        by_image = {a["image_id"]: a for a in data["annotations"]}
    else:
        from pycocotools.coco import COCO
        with _quiet():
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
    for info in data["images"]:
        if not (image_root / info["file_name"]).is_file():
            raise GroundTruthError(f"image {info['file_name']} of {annotations} not found under {images}")

    def semantic(info: dict) -> np.ndarray:
        height, width = info["height"], info["width"]
        if panoptic:
            annotation = by_image.get(info["id"])
            target = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
            if annotation is None:
                return target
            rgb = np.asarray(Image.open(png_root / annotation["file_name"]).convert("RGB"), dtype=np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
            for segment in annotation["segments_info"]:
                value = IGNORE_INDEX if segment.get("iscrowd") else index_of[segment["category_id"]]
                target[ids == segment["id"]] = value
            return target
        target = np.zeros((height, width), dtype=np.uint8)  # background where nothing is annotated
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]], iscrowd=None))
        for ann in sorted(anns, key=lambda a: -a.get("area", 0)):  # small objects stay on top
            target[coco.annToMask(ann).astype(bool)] = index_of[ann["category_id"]]
        for ann in anns:  # crowd regions are ignored, as in COCO's own evaluation
            if ann.get("iscrowd"):
                target[coco.annToMask(ann).astype(bool)] = IGNORE_INDEX
        return target

    keys = _pack_keys([image_root / info["file_name"] for info in data["images"]], image_root)

    def samples() -> Iterator[GroundTruthSample]:
        for info in data["images"]:
            file = image_root / info["file_name"]
            yield GroundTruthSample(keys[file], file.read_bytes(),
                                    file.suffix.lower().lstrip("."), semantic(info))

    return GroundTruth(classes, samples, count=len(data["images"]))


def shard_ground_truth(inputs: list[Location], classes_file: Location) -> GroundTruth:
    """Shards whose samples carry ``seg.png`` beside the image."""
    classes = read_class_list(classes_file)
    try:
        shards = [s.url for s in list_shards(inputs)]
    except (ValueError, OSError) as err:
        raise GroundTruthError(f"ground-truth shards: {err}") from None
    if not shards:
        raise GroundTruthError(f"ground-truth shards: none found for {inputs}")

    def samples() -> Iterator[GroundTruthSample]:
        for url in shards:
            for raw in iter_tar_samples(inputs[0].at(url)):  # the inputs share their options
                key = raw["__key__"]
                if MASK_ENTRY not in raw:
                    raise GroundTruthError(f"sample {key} of {url} has no {MASK_ENTRY}")
                ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
                if ext is None:
                    raise GroundTruthError(f"sample {key} of {url} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
                name = f"{url}:{key}.{MASK_ENTRY}"
                yield GroundTruthSample(key, raw[ext], ext,
                                        _check_indices(decode_mask_png(raw[MASK_ENTRY], name), classes, name),
                                        url, raw.get("__uid__", key))

    return GroundTruth(classes, samples, shards=shards)


class _quiet:
    """pycocotools prints progress on stdout; keep it off ours."""

    def __enter__(self):
        import contextlib
        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)
