"""The labels as FiftyOne samples: per labelled image an ``fo.Sample`` whose ``Detections`` field
holds one ``fo.Detection`` per label (its mask cropped to its box, as FiftyOne stores instance
masks; the label's score as ``confidence``; its area and prompt points as attributes) and whose
``Keypoints`` field holds the points, so the App draws masks, boxes and points.

FiftyOne shows media files, and the images live inside tar shards: each sample's image (as
labelled, EXIF applied) is written once to ``media_dir`` as PNG. ``fiftyone_samples`` builds the
samples without FiftyOne's database; ``to_fiftyone`` adds them to a dataset (which starts or
connects to that database).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

import numpy as np

from pipeline.io.storage import Location
from pipeline.store.labelset import LabelSet, Sample, label_mask, label_points, open_output

if TYPE_CHECKING:
    import fiftyone as fo


def media_name(sample: Sample) -> str:
    """The image's file name under ``media_dir``: ``<shard_id>/<uid>.png``, with characters a file
    name cannot hold replaced and a short hash of the uid added when any were (no two collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample.uid)
    if safe != sample.uid:
        safe += "-" + hashlib.sha1(sample.uid.encode()).hexdigest()[:8]
    return f"{sample.shard_id}/{safe}.png"


def _fraction_at_least(pixels: int, size: int, start: float = 0.0) -> float:
    """The smallest float f >= pixels/size - start with int((start + f) * size) == pixels: FiftyOne
    turns relative boxes into pixels by truncating (``int(w * x)``), and 41 / 160 * 160 may come
    out as 40.99999999999999, which would shift the mask a pixel and stretch it by one."""
    value = pixels / size - start
    while int((start + value) * size) < pixels:
        value = float(np.nextafter(value, np.inf))
    return value


def fiftyone_box(bbox: list[int], width: int, height: int) -> list[float]:
    """A COCO pixel box (x, y, w, h) -> FiftyOne's relative [x, y, w, h], chosen so that FiftyOne's
    own conversion back gives exactly those pixels."""
    x, y, w, h = bbox
    rel_x, rel_y = _fraction_at_least(x, width), _fraction_at_least(y, height)
    return [rel_x, rel_y, _fraction_at_least(x + w, width, rel_x), _fraction_at_least(y + h, height, rel_y)]


def _relative(x: float, y: float, sample: Sample) -> list[float]:
    """A pixel index -> FiftyOne's relative coordinates of the pixel's centre."""
    return [(x + 0.5) / sample.width, (y + 0.5) / sample.height]


def fiftyone_sample(sample: Sample, filepath: str, label_field: str = "gemlabel") -> "fo.Sample":
    """One labelled image as an ``fo.Sample`` (no database needed): ``label_field`` holds the
    ``Detections``, ``<label_field>_points`` the ``Keypoints``; ``sample_id``, ``key`` and ``shard``
    say where it came from."""
    import fiftyone as fo
    detections, keypoints = [], []
    for label in sample.labels:
        points = [_relative(x, y, sample) for x, y in label_points(label)]
        x, y, w, h = label["bbox"]
        detections.append(fo.Detection(label=label["name"], mask=label_mask(label)[y:y + h, x:x + w],
                                       bounding_box=fiftyone_box(label["bbox"], sample.width, sample.height),
                                       confidence=label["score"], area=int(label["area"]), points=points))
        keypoints.append(fo.Keypoint(label=label["name"], points=points))
    return fo.Sample(filepath=filepath, metadata=fo.ImageMetadata(width=sample.width, height=sample.height),
                     sample_id=sample.sample_id, key=sample.key, shard=sample.shard,
                     **{label_field: fo.Detections(detections=detections),
                        f"{label_field}_points": fo.Keypoints(keypoints=keypoints)})


def fiftyone_samples(output: Union[str, Location, LabelSet], media_dir: str, *,
                     storage_options: Optional[dict] = None, classes: Optional[Iterable[Union[str, int]]] = None,
                     min_score: Optional[float] = None, shards: Optional[Iterable[str]] = None,
                     label_field: str = "gemlabel") -> Iterator["fo.Sample"]:
    """The output's labelled images (filtered as ``LabelSet.samples`` filters) as ``fo.Sample``s,
    each image written to the local folder ``media_dir`` as it is reached (one pass per shard)."""
    labels = open_output(output, storage_options)
    root = Path(media_dir).resolve()
    for sample in labels.samples(classes=classes, min_score=min_score, shards=shards):
        path = root / media_name(sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        sample.image.save(partial, format="PNG")
        partial.replace(path)  # a file under its name is a whole image
        yield fiftyone_sample(sample, str(path), label_field)


def to_fiftyone(output: Union[str, Location, LabelSet], media_dir: str, *, name: Optional[str] = None,
                persistent: bool = False, storage_options: Optional[dict] = None,
                classes: Optional[Iterable[Union[str, int]]] = None, min_score: Optional[float] = None,
                shards: Optional[Iterable[str]] = None, label_field: str = "gemlabel") -> "fo.Dataset":
    """A FiftyOne dataset of the output's labelled images (see ``fiftyone_samples``), ready for
    ``fo.launch_app``; ``persistent`` keeps it in FiftyOne's database after the process ends."""
    import fiftyone as fo
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(fiftyone_samples(output, media_dir, storage_options=storage_options, classes=classes,
                                         min_score=min_score, shards=shards, label_field=label_field))
    return dataset
