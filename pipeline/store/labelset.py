"""Read a finished gemlabel output back: its vocabulary, its done shards, their label rows, and
the images themselves out of the input shards (one pass per shard, however many images).

Every command that consumes labels (show, export) goes through here, so they see the same
shards (those with a stats marker, i.e. done) and decode masks the same way.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.config import class_labels
from pipeline.store.rle import decode_mask
from pipeline.store.layout import OutputLayout, read_markers, read_output_config
from pipeline.io.storage import Location, file_identity, same_file_version


class NotAnOutputError(FileNotFoundError):
    """The given prefix holds no gemlabel output."""


class InputChangedError(RuntimeError):
    """An input shard is gone, or is not the file that was labelled: its images would not match
    its labels."""


@dataclass(frozen=True)
class LabelSet:
    """A done output: where it is, its vocabulary and its done shards (shard_id -> marker)."""

    root: Location
    class_names: list[str]
    markers: dict[str, dict]
    fingerprint: str

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.root)

    def shard_ids(self) -> list[str]:
        return sorted(self.markers)

    def rows(self, shard_id: str, columns: Optional[list[str]] = None) -> list[dict]:
        """The Parquet rows of one done shard, in shard order."""
        fs, path = self.layout.labels_file(shard_id).fs_path
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns).to_pylist()

    def all_rows(self, columns: Optional[list[str]] = None) -> Iterator[dict]:
        for shard_id in self.shard_ids():
            yield from self.rows(shard_id, columns)

    def input_shard(self, shard_id: str) -> Location:
        """The input shard of a labels shard, whose images a consumer is about to read, checked
        against the identity (size, etag or mtime) its marker recorded when it was labelled."""
        shard_url = self.markers[shard_id]["shard"]
        shard = self.root.at(shard_url)
        recorded = self.markers[shard_id].get("input")
        info = shard.stat()
        if info is None or info.get("type") == "directory":
            raise InputChangedError(f"{shard_url}: the input shard is gone (moved or deleted since it was labelled)")
        now = file_identity(info)
        if not same_file_version(recorded, now):
            raise InputChangedError(f"{shard_url}: the input shard changed since it was labelled (then {recorded}, "
                                    f"now {now}); relabel it (rerun gemlabel label) before using its images")
        return shard


def open_labelset(output: Location) -> LabelSet:
    layout = OutputLayout(output.at(output.url.rstrip("/")))
    config = read_output_config(layout)
    if config is None:
        raise NotAnOutputError(f"{output} is not a gemlabel output (no _config.json)")
    markers = read_markers(layout)
    if not markers:
        raise NotAnOutputError(f"{output} has no labelled shards yet (no stats markers)")
    return LabelSet(layout.root, class_labels(config["settings"]["vocab"]), markers, config["fingerprint"])


def open_output(output: Union[str, Location], storage_options: Optional[dict] = None) -> LabelSet:
    """An output folder (local or a URL, with its fsspec storage options) opened for reading."""
    return open_labelset(output if isinstance(output, Location) else Location(output, storage_options or {}))


def label_mask(label: dict) -> np.ndarray:
    """A label's bool (H, W) mask."""
    return decode_mask(label["rle_size"], label["rle_counts"])


def label_points(label: dict) -> list[tuple[int, int]]:
    """The label's prompt points: the ``points`` list when the output has one, else the peak."""
    points = label.get("points")
    if points:
        return [(int(p["x"]), int(p["y"])) for p in points]
    return [(int(label["point_x"]), int(label["point_y"]))]


def decode_image(raw: dict) -> Image.Image:
    """A raw webdataset sample -> the RGB image as labelled (EXIF orientation applied)."""
    from gem.preprocess import to_rgb  # torch: only once images are read, not for the CLI's parser
    from pipeline.io.tar import image_entry
    entry = image_entry(raw)
    if entry is None:
        raise ValueError(f"no image in sample {raw.get('__key__')}")
    image = Image.open(io.BytesIO(raw[entry]))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def sample_uid(row: dict) -> str:
    """The sample's name within its shard (its key, ``key#2`` for a repeated key): the part of
    ``sample_id`` after the shard id, as the reader names it (``__uid__``)."""
    return row["sample_id"].split("/", 1)[1]


def fetch_images(shard: Location, uids: Iterable[str]) -> Iterator[tuple[str, Image.Image]]:
    """(uid, image) for the wanted samples of one shard (see ``sample_uid``), read in one pass;
    stops once all are found."""
    wanted = set(uids)
    if not wanted:
        return
    from pipeline.io.tar import iter_tar_samples
    for raw in iter_tar_samples(shard):
        uid = raw.get("__uid__")
        if uid in wanted:
            wanted.discard(uid)
            yield uid, decode_image(raw)
            if not wanted:
                return
