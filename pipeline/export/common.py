"""What every export format shares: its options, where files go, split assignment, images.

An export lives in its own folder (default ``OUT/_exports/<format>``):

    DEST/_export.json            the options, the labels' fingerprint
    DEST/_done/<shard_id>.json   written last for each labels shard: the shard is exported
    DEST/...                     the format's own layout (see each format's module)
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from PIL import Image

from pipeline.config import ThresholdConfig
from pipeline.store.labelset import LabelSet
from pipeline.store.names import sample_stem
from pipeline.store.layout import read_output_config
from pipeline.io.storage import Location

FORMATS = ("coco", "semantic", "yolo-seg")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


class ExportError(ValueError):
    """Bad export options: the message says which and why."""


@dataclass(frozen=True)
class ExportOptions:
    format: str
    dest: Location                       # the export's folder, with the options to write it
    instances: bool = False              # coco: one annotation per connected component
    min_area: Optional[int] = None       # instances smaller than this are dropped; None: the labelling run's
    images: bool = False                 # copy the images out of the shards
    image_format: str = "jpg"            # jpg | png for copied images (EXIF orientation applied)
    background_index: int = 255          # semantic: label map value of background / ignored pixels
    palette: bool = False                # semantic: palette PNGs (for viewing) instead of grey class indices
    splits: dict[str, str] = field(default_factory=dict)  # split name -> glob on the shard URL
    cpus_per_task: float = 0.5

    def resolved(self, labelset: LabelSet) -> "ExportOptions":
        """The options with ``min_area`` taken from the labelling run where not given."""
        return self if self.min_area is not None else replace(self, min_area=labelling_min_area(labelset))

    def check(self, num_classes: int) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"--format: one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.min_area is not None and self.min_area < 1:
            raise ExportError(f"--min-area: must be at least 1, got {self.min_area}")
        if self.image_format not in IMAGE_FORMATS:
            raise ExportError(f"--image-format: one of {', '.join(IMAGE_FORMATS)}; got {self.image_format!r}")
        if self.cpus_per_task <= 0:
            raise ExportError(f"--cpus-per-task: must be positive, got {self.cpus_per_task}")
        if self.format == "semantic":
            if not 0 <= self.background_index <= 255:
                raise ExportError(f"--background-index: must be in [0, 255], got {self.background_index}")
            if 0 < self.background_index < num_classes:
                raise ExportError(f"--background-index: {self.background_index} is a class index (classes use "
                                  f"0..{num_classes - 1}); use 0 (classes then start at 1) or >= {num_classes}")
            if num_classes + (self.background_index == 0) > 256:
                raise ExportError(f"semantic: {num_classes} classes do not fit an 8-bit palette PNG")

    def key(self) -> dict:
        """The options that change what is written (a done shard with other options is redone)."""
        data = asdict(self)
        for name in ("dest", "cpus_per_task"):
            data.pop(name)
        return data

    def key_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]


def labelling_min_area(labelset: LabelSet) -> int:
    """The labelling run's ``thresholds.min_area`` (from ``_config.json``): classes were kept only
    from that size, so instances default to it too."""
    config = read_output_config(labelset.layout) or {}
    thresholds = config.get("settings", {}).get("thresholds") or {}
    return int(thresholds.get("min_area", ThresholdConfig().min_area))


def parse_splits(text: Optional[str]) -> dict[str, str]:
    """'train=*train*,val=*val*' -> {'train': '*train*', 'val': '*val*'}."""
    if not text:
        return {}
    splits = {}
    for item in text.split(","):
        name, sep, pattern = item.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise ExportError(f"--splits: expected NAME=GLOB[,NAME=GLOB...], got {item!r}")
        splits[name.strip()] = pattern.strip()
    return splits


def split_of(shard_url: str, splits: dict[str, str]) -> Optional[str]:
    """The first split whose glob matches the input shard's URL (None: no split does);
    everything is 'train' by default."""
    for name, pattern in splits.items():
        if fnmatch.fnmatch(shard_url, pattern):
            return name
    return "train" if not splits else None


def assign_splits(labelset: LabelSet, splits: dict[str, str]) -> dict[str, str]:
    """shard_id -> split for every shard; shards no glob matches are an ExportError naming them
    (give a catch-all such as ``rest=*`` to put them somewhere)."""
    assigned = {shard_id: split_of(marker["shard"], splits) for shard_id, marker in labelset.markers.items()}
    unmatched = sorted(labelset.markers[s]["shard"] for s, split in assigned.items() if split is None)
    if unmatched:
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise ExportError(f"--splits: {len(unmatched)} shard(s) match no split: {', '.join(unmatched[:5])}{more}; "
                          f"fix the globs or add a catch-all split, e.g. 'rest=*'")
    return assigned


def image_stem(sample_id: str) -> str:
    """A flat, unique file name stem for a sample (see ``pipeline.store.names``)."""
    return sample_stem(sample_id)


def image_file(sample_id: str, options: ExportOptions) -> str:
    return f"{image_stem(sample_id)}.{options.image_format}"


def write_image(file: Location, image: Image.Image, options: ExportOptions) -> None:
    buffer = io.BytesIO()
    kwargs = {"quality": 95} if options.image_format == "jpg" else {}
    image.save(buffer, format=IMAGE_FORMATS[options.image_format], **kwargs)
    file.write_bytes_atomic(buffer.getvalue())


def done_file(dest: Location, shard_id: str) -> Location:
    return dest.child("_done", f"{shard_id}.json")


@dataclass
class ShardContext:
    """One labels shard being exported."""

    labelset: LabelSet
    shard_id: str
    split: str
    options: ExportOptions
    written: list[str] = field(default_factory=list)  # the files' paths under dest, for the done marker

    def out(self, *parts: str) -> Location:
        """Where one of this shard's files goes (recorded: a later export that no longer covers
        the shard removes it)."""
        self.written.append("/".join(parts))
        return self.options.dest.child(*parts)
