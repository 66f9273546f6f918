"""Read a finished gemlabel output back: its vocabulary, its done shards, their label rows, and
the images themselves out of the input shards (one pass per shard, however many images).

Every command that consumes labels (show, export) and every library user (``gemlabel.open_output``)
goes through here, so they see the same shards (those with a stats marker, i.e. done), decode
masks the same way and get the image exactly as it was labelled (EXIF orientation applied)::

    labels = gemlabel.open_output("s3://bucket/labels", storage_options={...})
    for sample in labels.samples(classes=["dog"], min_score=0.5):
        detections = sample.to_detections()      # supervision.Detections
        image = sample.image                     # read from its input shard on first use
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.config import class_labels
from pipeline.store.rle import decode_mask
from pipeline.store.layout import OutputLayout, read_markers, read_output_config
from pipeline.io.storage import Location, file_identity, same_file_version

if TYPE_CHECKING:  # supervision is an optional extra (gemlabel[integrations])
    import supervision as sv


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

    def select_shards(self, shards: Optional[Iterable[str]] = None) -> list[str]:
        """Done shard ids for ``shards`` (ids or input shard URLs; None: all), in order. An unknown
        one is a ValueError naming it, not silently nothing."""
        if shards is None:
            return self.shard_ids()
        by_url = {m["shard"]: sid for sid, m in self.markers.items()}
        wanted = [by_url.get(s, s) for s in ([shards] if isinstance(shards, str) else shards)]
        unknown = [s for s in wanted if s not in self.markers]
        if unknown:
            raise ValueError(f"not a done shard of {self.root}: {', '.join(unknown)}")
        return sorted(set(wanted))

    def class_ids(self, classes: Optional[Iterable[Union[str, int]]]) -> Optional[set[int]]:
        """Class names or ids -> ids (None: every class); an unknown class is a ValueError."""
        if classes is None:
            return None
        ids = set()
        for c in [classes] if isinstance(classes, (str, int)) else classes:
            if isinstance(c, str) and c in self.class_names:
                ids.add(self.class_names.index(c))
            elif isinstance(c, int) and 0 <= c < len(self.class_names):
                ids.add(c)
            else:
                raise ValueError(f"unknown class {c!r} (the output's classes: {', '.join(self.class_names)})")
        return ids

    def samples(self, classes: Optional[Iterable[Union[str, int]]] = None, min_score: Optional[float] = None,
                shards: Optional[Iterable[str]] = None) -> Iterator["Sample"]:
        """The labelled images (status ok), shard by shard in shard order. With ``classes`` and/or
        ``min_score`` a sample keeps only its labels of those classes scoring at least that (a NaN
        score never does) and samples left with none are skipped. Images are read lazily: a
        sample's ``image`` is read from its input shard on first use, and reading each sample's
        image in turn is one pass over each shard."""
        wanted = self.class_ids(classes)
        for shard_id in self.select_shards(shards):
            images: Optional[_ShardImages] = None
            for row in self.rows(shard_id):
                if row["status"] != "ok":
                    continue
                labels = [l for l in row["labels"] if (wanted is None or l["class_id"] in wanted)
                          and (min_score is None or (math.isfinite(l["score"]) and l["score"] >= min_score))]
                if not labels and (wanted is not None or min_score is not None):
                    continue
                images = images or _ShardImages(self.root.at(row["shard"]))
                yield Sample(row["sample_id"], row["key"], shard_id, row["shard"], row["width"], row["height"],
                             labels, images)
            if images is not None:
                images.close()


class _ShardImages:
    """One input shard's images for its samples: a tar stream read forward as images are asked
    for (one pass for images asked in shard order), reopened only for one already passed."""

    def __init__(self, shard: Location):
        self.shard = shard
        self._stream: Optional[Iterator[dict]] = None
        self._passed: set[str] = set()

    def image(self, uid: str) -> Image.Image:
        if self._stream is None or uid in self._passed:
            self.close()
            from pipeline.io.tar import iter_tar_samples
            self._stream, self._passed = iter_tar_samples(self.shard), set()
        try:
            for raw in self._stream:
                self._passed.add(raw["__uid__"])
                if raw["__uid__"] == uid:
                    return decode_image(raw)
        except BaseException:  # an unreadable shard: the next ask starts a fresh pass
            self.close()
            raise
        self.close()
        raise KeyError(f"sample {uid} is not in {self.shard} (the shard changed since it was labelled)")

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # type: ignore[attr-defined]  # a generator: closes the tar file
        self._stream = None


@dataclass(eq=False)
class Sample:
    """One labelled image: its ids, size and labels (Parquet label dicts), its image on demand."""

    sample_id: str
    key: str
    shard_id: str
    shard: str          # the input shard's URL
    width: int
    height: int
    labels: list[dict]
    _images: _ShardImages = field(repr=False)
    _image: Optional[Image.Image] = field(default=None, repr=False)

    @property
    def uid(self) -> str:
        return self.sample_id.split("/", 1)[1]

    @property
    def image(self) -> Image.Image:
        """The RGB image as labelled (EXIF orientation applied), read once from its shard."""
        if self._image is None:
            self._image = self._images.image(self.uid)
        return self._image

    def masks(self) -> np.ndarray:
        """The labels' masks, bool (N, height, width)."""
        if not self.labels:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([label_mask(label) for label in self.labels])

    def xyxy(self) -> np.ndarray:
        """The labels' boxes as (x0, y0, x1, y1) pixel corners, float32 (N, 4): COCO's x+w."""
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (label["bbox"] for label in self.labels)]
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def to_detections(self) -> "sv.Detections":
        """supervision Detections: mask, xyxy, class_id, confidence (the label's score), and in
        ``data`` class_name (what sv's LabelAnnotator shows), point (the peak, x y) and sample_id."""
        import supervision as sv
        n = len(self.labels)
        data: dict[str, Any] = {
            "class_name": np.asarray([label["name"] for label in self.labels], dtype=object),
            "point": np.asarray([[label["point_x"], label["point_y"]] for label in self.labels],
                                dtype=np.int32).reshape(-1, 2),
            "sample_id": np.asarray([self.sample_id] * n, dtype=object)}
        return sv.Detections(xyxy=self.xyxy(), mask=self.masks(),
                             class_id=np.asarray([label["class_id"] for label in self.labels], dtype=int),
                             confidence=np.asarray([label["score"] for label in self.labels], dtype=np.float32),
                             data=data)


def open_labelset(output: Location) -> LabelSet:
    layout = OutputLayout(output.at(output.url.rstrip("/")))
    config = read_output_config(layout)
    if config is None:
        raise NotAnOutputError(f"{output} is not a gemlabel output (no _config.json)")
    markers = read_markers(layout)
    if not markers:
        raise NotAnOutputError(f"{output} has no labelled shards yet (no stats markers)")
    return LabelSet(layout.root, class_labels(config["settings"]["vocab"]), markers, config["fingerprint"])


def open_output(output: Union[str, Location, LabelSet], storage_options: Optional[dict] = None) -> LabelSet:
    """An output folder (local or a URL, with its fsspec storage options) opened for reading; an
    opened one (a ``LabelSet``) as it is, so every reader takes either."""
    if isinstance(output, LabelSet):
        return output
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
