"""Stream one webdataset shard: samples read and decoded on background threads, in order.

The tar is read through fsspec (webdataset has no s3:// opener) and split into samples with
webdataset's own tar iterators. Each sample is decoded on a thread pool while the model works on
the previous batch. A sample that cannot be decoded becomes a ``DecodedSample`` with an error; a
shard that cannot be read (missing, truncated) raises ``ShardReadError`` from the iterator.
"""
from __future__ import annotations

import io
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from PIL import Image, ImageOps
from webdataset.tariterators import group_by_keys, tar_file_iterator

from gem.preprocess import image_to_tensor, to_rgb
from pipeline.storage import StorageOptions, open_file

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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


def iter_tar_samples(url: str, storage_options: Optional[StorageOptions] = None) -> Iterator[dict]:
    """Raw samples ({'__key__': ..., 'jpg': bytes, ...}) of one tar, in order."""
    try:
        with open_file(url, "rb", storage_options) as stream:
            files = ({**entry, "__url__": url} for entry in tar_file_iterator(stream))
            yield from group_by_keys(files, handler=_skip_duplicate_files)
    except Exception as err:  # missing file, tarfile.ReadError on truncation, storage errors

        raise ShardReadError(f"{type(err).__name__}: {err}") from err


def _skip_duplicate_files(err: Exception) -> bool:
    """A repeated file name inside one sample: keep the first and go on (webdataset handler)."""
    if isinstance(err, ValueError) and "duplicate file name" in str(err):
        warnings.warn(str(err))
        return True
    return False


def _image_entry(sample: dict) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    for suffix in sample:
        if not suffix.startswith("__") and suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return suffix
    return None


def decode_sample(index: int, raw: dict, input_size: Union[tuple[int, int], Callable[[int, int], tuple[int, int]]],
                  mean, std) -> DecodedSample:
    """Bytes -> the model's input tensor and the image's size (EXIF orientation applied); never
    raises. Images over Pillow's decompression-bomb limit are errors too. ``input_size``: the
    model input's (height, width), or a function of the image's (height, width) giving it."""
    key = raw.get("__key__", f"#{index}")
    entry = _image_entry(raw)
    if entry is None:
        found = sorted(k for k in raw if not k.startswith("__"))
        return DecodedSample(index, key, error=f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample; "
                                               f"found {found}", error_kind="no_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw[entry]))
            image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
        size = input_size(image.height, image.width) if callable(input_size) else input_size
        tensor = image_to_tensor(image, size, mean, std)
    except Exception as err:  # any decoder failure is this sample's, not the shard's
        return DecodedSample(index, key, error=f"decode {entry}: {type(err).__name__}: {err}",
                             error_kind=f"decode:{type(err).__name__}")
    return DecodedSample(index, key, image.width, image.height, tensor)


_END = object()


class PrefetchingReader:
    """Iterates DecodedSamples of a shard; reading and decoding run ahead on background threads."""

    def __init__(self, url: str, decode: Callable[[int, dict], DecodedSample], threads: int = 4,
                 prefetch: int = 64, storage_options: Optional[StorageOptions] = None):
        self.url, self._decode, self._storage_options = url, decode, storage_options
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
            for index, raw in enumerate(iter_tar_samples(self.url, self._storage_options)):
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
