"""Getting batches onto the model's device: which decoder, pinned copies, a CUDA stream, GPU JPEG decode.

On a GPU the model thread launches work on its own CUDA stream from pinned host memory with
non-blocking copies, so the copy of batch N+1 overlaps the compute of batch N; images decoded on
the CPU travel as uint8 pixels and are normalised on the GPU (a quarter of the bytes). With
``decode: gpu`` (or ``auto`` on a GPU) plain JPEGs are decoded in batches by nvJPEG
(``torchvision.io.decode_jpeg(..., device="cuda")``) and resized there, each to the model input
size of its own image size (``resize: short_side`` keeps aspect ratios); everything else (PNG,
WebP, CMYK or EXIF-rotated JPEGs) and any JPEG nvJPEG refuses is decoded on the CPU, per image.
Only the selection logic runs without a GPU; the GPU branch is kept small for that reason.
"""
from __future__ import annotations

import contextlib
import io
import typing
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from gem.preprocess import normalize
from pipeline.config import DecodeMode
from pipeline.io.image_header import EXIF_ORIENTATION
from pipeline.worker.decode import DecodedSample
from pipeline.io.tar import image_entry

DECODE_CHOICES = typing.get_args(DecodeMode)


def gpu_decoder_available(device: torch.device) -> bool:
    """torchvision's nvJPEG batch decoder is usable on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from gem.torchvision_shim import import_torchvision
        import_torchvision()
        return hasattr(torch.ops.image, "decode_jpegs_cuda")
    except Exception:  # torchvision without its compiled image ops
        return False


def resolve_decode(decode: str, device: torch.device, available: Optional[bool] = None) -> str:
    """'auto' -> 'gpu' on a CUDA device whose decoder works, else 'cpu'; 'gpu' without one is an
    error (one line, raised where the worker starts)."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode: one of {', '.join(DECODE_CHOICES)}; got {decode!r}")
    available = gpu_decoder_available(device) if available is None else available
    if decode == "gpu" and not available:
        raise ValueError(f"decode: gpu needs a CUDA device with torchvision's nvJPEG decoder; this worker has "
                         f"{device} (use decode: auto or cpu)")
    return "gpu" if decode == "gpu" or (decode == "auto" and available) else "cpu"


def gpu_ready_jpeg(index: int, raw: dict) -> Optional[DecodedSample]:
    """A sample nvJPEG can take as is (baseline RGB or grey JPEG, no EXIF rotation), from its
    header alone; None means decode it on the CPU."""
    entry = image_entry(raw)
    if entry is None or entry.rsplit(".", 1)[-1] not in ("jpg", "jpeg"):
        return None
    try:
        header = Image.open(io.BytesIO(raw[entry]))  # reads the header only
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return None
        if header.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return None
        width, height = header.size
        if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            return None  # the CPU path turns it into its error row
    except Exception:
        return None
    key = raw.get("__key__", f"#{index}")
    return DecodedSample(index, key, width, height, encoded=raw[entry], uid=raw.get("__uid__", key))


def gpu_decode_resize(encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]], mean, std,
                      device: torch.device) -> list[torch.Tensor]:  # pragma: no cover - needs a GPU
    """JPEG bytes -> each image's (3, H, W) normalised model input at its size in ``sizes``,
    decoded and resized on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    resized = [F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True,
                             align_corners=False).clamp_(0, 255)[0] for image, size in zip(images, sizes)]
    return [normalize(image, mean, std) for image in resized]


class DeviceFeeder:
    """Batches of DecodedSamples -> one input tensor on the model's device (see the module doc)."""

    def __init__(self, device: torch.device, model_size: Callable[[int, int], tuple[int, int]], mean, std,
                 cpu_decode: Callable[[int, dict], DecodedSample]):
        """``model_size``: an image's (height, width) -> its model input's."""
        self.device, self.model_size, self.mean, self.std = device, model_size, mean, std
        self._cpu_decode = cpu_decode
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def inputs(self, batch: list[DecodedSample]) -> tuple[list[torch.Tensor], list[DecodedSample]]:
        """The batch's inputs on the device (sizes may differ), and the samples they are of (a JPEG
        the GPU could not decode and the CPU cannot either is dropped, carrying its error). Each
        sample's ``tensor`` becomes its device copy: post-processing (PAMR) reads the image."""
        on_gpu = [s for s in batch if s.encoded is not None]
        if on_gpu:  # pragma: no cover - needs a GPU
            batch = self._decode_on_gpu(batch, on_gpu)
        ready = [s for s in batch if s.tensor is not None]
        if self.cuda:  # pragma: no cover - needs a GPU
            for sample in ready:
                if not sample.tensor.is_cuda:  # decoded on the CPU: uint8 pixels, normalised here
                    sample.tensor = normalize(sample.tensor.pin_memory().to(self.device, non_blocking=True),
                                              self.mean, self.std)
        return [s.tensor for s in ready], ready

    def _decode_on_gpu(self, batch, on_gpu):  # pragma: no cover - needs a GPU
        try:
            sizes = [self.model_size(s.height, s.width) for s in on_gpu]
            decoded = gpu_decode_resize([s.encoded for s in on_gpu], sizes, self.mean, self.std, self.device)
            for sample, tensor in zip(on_gpu, decoded):
                sample.tensor, sample.encoded = tensor, None
        except Exception:  # one bad JPEG fails nvJPEG's batch: decode these on the CPU, one by one
            for sample in on_gpu:
                fallback = self._cpu_decode(sample.index, {"__key__": sample.key, "__uid__": sample.uid,
                                                            "jpg": sample.encoded})
                sample.tensor, sample.encoded = fallback.tensor, None
                sample.error, sample.error_kind = fallback.error, fallback.error_kind
                sample.decode_s, sample.resize_s = fallback.decode_s, fallback.resize_s
        return batch

    def ready(self) -> Optional[Callable[[], None]]:
        """Waits until what was launched on the stream so far is computed (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()  # pragma: no cover - needs a GPU
        event.record(self.stream)
        return event.synchronize
