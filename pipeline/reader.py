"""Stream one webdataset shard: samples read and decoded on background threads, in order.

The tar is read through fsspec (webdataset has no s3:// opener) and split into samples with
webdataset's own tar iterators. Each sample is decoded on a thread pool while the model works on
the previous batch. A sample that cannot be decoded becomes a ``DecodedSample`` with an error; a
shard that cannot be read (missing, truncated) raises ``ShardReadError`` from the iterator.

How tar members become rows (every image member gets exactly one row):

- Members are grouped as webdataset groups them: a sample's key is the member's path up to the
  first dot of its file name (``a/img.v1.jpg`` -> key ``a/img``, entry ``v1.jpg``), and adjacent
  members with the same key form one sample (``x.jpg`` + ``x.txt``).
- A sample holding several images (``x.jpg`` + ``x.png``, ``img.v1.jpg`` + ``img.v2.jpg``) gives
  one row per image, in tar order; a member name repeated inside a sample starts a new sample.
- ``sample_id`` is ``<shard id>/<key>`` for the first row of a key in the shard and
  ``<shard id>/<key>#2``, ``#3``, ... for later ones (repeated keys, adjacent or not, and the
  extra images of one key), so ids are unique within the output.
- A ``seg.png`` entry (``key.seg.png``) is the image's ground-truth mask, not an image: it rides
  with the sample (``gemlabel eval`` reads it) and gets no row of its own.
- A sample with no image is an error row. A tar without its end-of-archive blocks (cut, even
  exactly at a member boundary) is a truncated shard.
"""
from __future__ import annotations

import io
import posixpath
import queue
import re
import tarfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from PIL import Image, ImageOps

from gem.preprocess import image_to_tensor, resized_pixels, to_rgb
from pipeline.storage import Location

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Entries that annotate the sample's image rather than being images to label: the ground-truth
# mask of evaluation shards (``key.jpg`` + ``key.seg.png``).
MASK_ENTRY = "seg.png"


class ShardReadError(RuntimeError):
    """The shard itself could not be read: the whole shard is retried."""


@dataclass
class DecodedSample:
    index: int                 # position in the shard
    key: str
    width: int = 0             # of the image as displayed (EXIF orientation applied)
    height: int = 0
    tensor: Optional[torch.Tensor] = None  # the model input; the decoded image itself is not kept
    error: Optional[str] = None
    error_kind: Optional[str] = None  # short label for the error histogram
    uid: str = ""              # unique within the shard: the key, or key#2, key#3 for repeats
    decode_s: float = 0.0      # CPU seconds spent decoding (bytes -> RGB pixels)
    resize_s: float = 0.0      # CPU seconds spent resizing and normalising to the model input
    encoded: Optional[bytes] = None  # a JPEG left for the accelerator to decode (tensor is None then)

    def __post_init__(self):
        self.uid = self.uid or self.key


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def error_text(err: BaseException) -> str:
    """``Type: message`` without run-specific object addresses (``<_io.BytesIO object at
    0x7f..>``), so two runs over the same data write equal rows."""
    return _ADDRESS.sub("", f"{type(err).__name__}: {err}")


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on its archive when the end-of-archive (all-zero) block is read: tarfile stops as
    quietly at a cut between two members as at a real end."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.gemlabel_complete = True
            raise


def iter_tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream, in order; raises tarfile.ReadError
    when the archive is cut (mid-member or at a member boundary)."""
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo) as archive:
        for member in archive:
            if member.isreg():
                yield member.name, archive.extractfile(member).read()
            archive.members = []  # streaming: keep no index of past members
        if not getattr(archive, "gemlabel_complete", False):
            raise tarfile.ReadError(f"truncated: no end-of-archive block after {archive.offset} bytes")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the file name, entry = the rest."""
    folder, base = posixpath.split(name)
    stem, dot, rest = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, rest if dot else ""


def _is_image(entry: str) -> bool:
    return entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and entry.lower() != MASK_ENTRY


def group_samples(members: Iterator[tuple[str, bytes]]) -> Iterator[dict]:
    """Members -> raw samples ({'__key__', '__uid__', entry: bytes}), one per image (see the
    module docstring for the rule)."""
    seen: dict[str, int] = {}

    def emit(sample: dict) -> Iterator[dict]:
        images = [entry for entry in sample if not entry.startswith("__") and _is_image(entry)]
        others = {k: v for k, v in sample.items() if k not in images}
        for entry in images or [None]:
            key = sample["__key__"]
            seen[key] = seen.get(key, 0) + 1
            uid = key if seen[key] == 1 else f"{key}#{seen[key]}"
            yield {**others, **({entry: sample[entry]} if entry else {}), "__uid__": uid}

    current: Optional[dict] = None
    for name, data in members:
        key, entry = split_member_name(name)
        if current is None or key != current["__key__"] or entry in current:
            if current is not None:
                yield from emit(current)
            current = {"__key__": key}
        current[entry] = data
    if current is not None:
        yield from emit(current)


def iter_tar_samples(source: Location) -> Iterator[dict]:
    """Raw samples ({'__key__': ..., '__uid__': ..., 'jpg': bytes, ...}) of one tar, in order."""
    try:
        with source.open("rb") as stream:
            for sample in group_samples(iter_tar_members(stream)):
                yield {**sample, "__url__": source.url}
    except Exception as err:  # missing file, tarfile.ReadError on truncation, storage errors
        raise ShardReadError(error_text(err)) from err


def image_entry(sample: dict) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    for suffix in sample:
        if not suffix.startswith("__") and _is_image(suffix):
            return suffix
    return None


EXIF_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _sideways(image: Image.Image) -> bool:
    """Its EXIF orientation turns it a quarter: shown, its width is its stored height."""
    return image.getexif().get(EXIF_ORIENTATION, 1) in _SIDEWAYS


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened (not yet decoded) image once its EXIF orientation is applied."""
    width, height = image.size
    return (height, width) if _sideways(image) else (width, height)


def draft_for(image: Image.Image, model_size: tuple[int, int]) -> None:
    """Have Pillow decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling: the decoder skips the
    detail it would throw away) where the result still covers the model input's (height, width)
    on both sides (the first picture of an MPO, as cameras write, alike); other formats, and
    images under twice the input's size, decode as they are."""
    if image.format not in ("JPEG", "MPO"):
        return
    height, width = model_size
    image.draft(image.mode, (height, width) if _sideways(image) else (width, height))


def decode_sample(index: int, raw: dict, input_size: Union[tuple[int, int], Callable[[int, int], tuple[int, int]]],
                  mean, std, normalized: bool = True, jpeg_draft: bool = False) -> DecodedSample:
    """Bytes -> the model's input tensor and the image's size (EXIF orientation applied); never
    raises. Images over Pillow's decompression-bomb limit are errors too. ``input_size``: the
    model input's (height, width), or a function of the image's (height, width) giving it.
    ``normalized=False``: the resized uint8 pixels, for ``gem.preprocess.normalize`` on the
    model's device. ``jpeg_draft``: large JPEGs decode at a reduced scale (``draft_for``); the
    size reported is still the image's own, which labels are written at."""
    key = raw.get("__key__", f"#{index}")
    uid = raw.get("__uid__", key)
    entry = image_entry(raw)
    if entry is None:
        found = sorted(k for k in raw if not k.startswith("__"))
        return DecodedSample(index, key, error=f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample; "
                                               f"found {found}", error_kind="no_image", uid=uid)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw[entry]))
            width, height = displayed_size(image)
            size = input_size(height, width) if callable(input_size) else input_size
            if jpeg_draft:
                draft_for(image, size)
            image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
        decoded = time.perf_counter()
        tensor = image_to_tensor(image, size, mean, std) if normalized else resized_pixels(image, size)
    except Exception as err:  # any decoder failure is this sample's, not the shard's
        return DecodedSample(index, key, error=f"decode {entry}: {error_text(err)}", uid=uid,
                             error_kind=f"decode:{type(err).__name__}", decode_s=time.perf_counter() - start)
    return DecodedSample(index, key, width, height, tensor, uid=uid,
                         decode_s=decoded - start, resize_s=time.perf_counter() - decoded)


_END = object()


class PrefetchingReader:
    """Iterates DecodedSamples of a shard; reading and decoding run ahead on background threads."""

    def __init__(self, source: Location, decode: Callable[[int, dict], DecodedSample], threads: int = 4,
                 prefetch: int = 64):
        self.source, self._decode = source, decode
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._futures: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="tar-reader", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._futures.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for index, raw in enumerate(iter_tar_samples(self.source)):
                if not self._put(self._pool.submit(self._decode, index, raw)):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __iter__(self) -> Iterator[DecodedSample]:
        self._reader.start()
        try:
            while True:
                item = self._futures.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item.result()
        finally:
            self._stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
