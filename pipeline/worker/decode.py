"""Decoding one shard's samples for the model: bytes -> the model input and the image's displayed
size (EXIF orientation applied; large JPEGs optionally drafted at a reduced scale), on background
threads ahead of the model (``PrefetchingReader``). A sample that cannot be decoded becomes a
``DecodedSample`` with an error; a shard that cannot be read raises ``ShardReadError``.
"""
from __future__ import annotations

import io
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from PIL import Image, ImageOps

from gem.preprocess import image_to_tensor, resized_pixels, to_rgb
from pipeline.io.image_header import displayed_size, is_sideways
from pipeline.io.storage import Location
from pipeline.io.tar import IMAGE_EXTENSIONS, error_text, image_entry, iter_tar_samples


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
    refine_input: Any = None   # what a refinement stage needs of the pixels (SAM's small encoder input)
    refine_state: Any = None   # that stage's per-image state once the model thread has run (SAM's embedding)

    def __post_init__(self):
        self.uid = self.uid or self.key


def draft_for(image: Image.Image, model_size: tuple[int, int]) -> None:
    """Have Pillow decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling: the decoder skips the
    detail it would throw away) where the result still covers the model input's (height, width)
    on both sides (the first picture of an MPO, as cameras write, alike); other formats, and
    images under twice the input's size, decode as they are."""
    if image.format not in ("JPEG", "MPO"):
        return
    height, width = model_size
    image.draft(image.mode, (height, width) if is_sideways(image) else (width, height))


def decode_sample(index: int, raw: dict, input_size: Union[tuple[int, int], Callable[[int, int], tuple[int, int]]],
                  mean, std, normalized: bool = True, jpeg_draft: bool = False,
                  refine_input: Optional[Callable[[Image.Image, int, int], Any]] = None) -> DecodedSample:
    """Bytes -> the model's input tensor and the image's size (EXIF orientation applied); never
    raises. Images over Pillow's decompression-bomb limit are errors too. ``input_size``: the
    model input's (height, width), or a function of the image's (height, width) giving it.
    ``normalized=False``: the resized uint8 pixels, for ``gem.preprocess.normalize`` on the
    model's device. ``jpeg_draft``: large JPEGs decode at a reduced scale (``draft_for``); the
    size reported is still the image's own, which labels are written at. ``refine_input``: what
    a refinement stage keeps of the decoded RGB image (given it and the displayed height and
    width), computed here on the decoding thread so that the full image is never kept."""
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
        kept = refine_input(image, height, width) if refine_input is not None else None
    except Exception as err:  # any decoder failure is this sample's, not the shard's
        return DecodedSample(index, key, error=f"decode {entry}: {error_text(err)}", uid=uid,
                             error_kind=f"decode:{type(err).__name__}", decode_s=time.perf_counter() - start)
    return DecodedSample(index, key, width, height, tensor, uid=uid, refine_input=kept,
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
