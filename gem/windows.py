"""Model input sizes and sliding-window inference, crops of many images batched together.

Resize: ``square`` squashes every image to one (height, width) (GEM's demo); ``short_side``
keeps the aspect ratio, scaling the short side to N unless that makes the long side exceed
``max_long_side`` (mmseg's ``Resize(scale=(max_long_side, N), keep_ratio=True)``).

Windows follow mmseg's ``slide_inference``: ``max(H - crop + stride - 1, 0) // stride + 1``
rows of windows (columns alike) at multiples of the stride, the last ones moved back inside the
image; each window's logits are upsampled to the window and overlapping windows averaged.
With ``pad_multiple`` (ProxyCLIP's 56, a multiple of its VFMs' patch sizes 8 and 14), a window
whose side is not a multiple of it is zero-padded (in normalised space) to the next multiple, the
floor half of the padding on the left / top, as the ProxyCLIP reference does; its logits are
computed at the padded size and the padding cut off again.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
RESIZE_MODES = ("square", "short_side")


@dataclass(frozen=True)
class SlideWindows:
    crop: int = 224
    stride: int = 112

    def __post_init__(self):
        if self.crop < 1 or not 1 <= self.stride <= self.crop:
            raise ValueError(f"slide needs crop >= 1 and 1 <= stride <= crop, got crop {self.crop}, "
                             f"stride {self.stride}")


@dataclass(frozen=True)
class ResizeSettings:
    """mode: square (to ``size``, height x width) or short_side (to ``short_side``, long side
    at most ``max_long_side``)."""

    mode: str = "square"
    size: tuple[int, int] = (448, 448)
    short_side: int = 448
    max_long_side: int = 2048

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {self.mode!r}")
        if min(self.size) < 1 or self.short_side < 1 or self.max_long_side < self.short_side:
            raise ValueError(f"resize sizes must be positive and max_long_side >= short_side, got {self}")

    def model_size(self, height: int, width: int, least: tuple[int, int] = (1, 1)) -> tuple[int, int]:
        """The model's input (height, width) for an image of (height, width), each side at least
        ``least`` (the model's patch: a 20000 x 20 image capped at max_long_side would otherwise
        get a short side of 2 pixels, less than one patch)."""
        if self.mode == "square":
            return tuple(self.size)
        scale = min(self.short_side / min(height, width), self.max_long_side / max(height, width))
        return max(least[0], int(height * scale + 0.5)), max(least[1], int(width * scale + 0.5))


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, in mmseg's order and placement."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that takes (height, width) to multiples of
    ``multiple``: the floor half before, the rest after; none on a side already a multiple."""
    def split(size: int) -> tuple[int, int]:
        extra = (multiple - size % multiple) % multiple
        return extra // 2, extra - extra // 2
    return (*split(width), *split(height))


SimilarityFn = Callable[[Tensor], Tensor]  # (n, 3, h, w) -> (n, words, gh, gw)


def grouped_similarities(similarities: SimilarityFn, images: Sequence[Tensor], max_batch: int) -> list[Tensor]:
    """Whole-image inference over images of any sizes: same-size images share forwards of at
    most ``max_batch``. Returns each image's (words, gh, gw)."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[tuple(image.shape)].append(index)
    out: list[Optional[Tensor]] = [None] * len(images)
    for indices in by_shape.values():
        for first in range(0, len(indices), max_batch):
            chunk = indices[first:first + max_batch]
            sims = similarities(torch.stack([images[i] for i in chunk]))
            for i, sim in zip(chunk, sims):
                out[i] = sim
    return out


def slide_logits(similarities: SimilarityFn, images: Sequence[Tensor], windows: SlideWindows,
                 max_batch: int, pad_multiple: int = 1) -> list[Tensor]:
    """Sliding-window logits of each (3, H, W) image: (words, H, W), windows averaged.

    All windows of all images go through the model together, ``max_batch`` same-shape crops
    per forward; crops are padded to multiples of ``pad_multiple`` first (1: never)."""
    crops = [(index, box) for index, image in enumerate(images)
             for box in window_boxes(image.shape[-2], image.shape[-1], windows.crop, windows.stride)]
    by_shape: dict[tuple[int, int], list[tuple[int, tuple]]] = defaultdict(list)
    for index, (y1, y2, x1, x2) in crops:
        by_shape[(y2 - y1, x2 - x1)].append((index, (y1, y2, x1, x2)))
    sums: list[Optional[Tensor]] = [None] * len(images)
    counts = [torch.zeros(image.shape[-2:], device=image.device) for image in images]
    for shape, members in by_shape.items():
        for first in range(0, len(members), max_batch):
            chunk = members[first:first + max_batch]
            batch = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
            left, right, top, bottom = padding(*shape, pad_multiple)
            if left or right or top or bottom:
                batch = F.pad(batch, (left, right, top, bottom))
            logits = F.interpolate(similarities(batch).float(), size=tuple(batch.shape[-2:]), mode="bilinear",
                                   align_corners=False)[:, :, top:top + shape[0], left:left + shape[1]]
            for (i, (y1, y2, x1, x2)), window in zip(chunk, logits):
                if sums[i] is None:
                    sums[i] = window.new_zeros((window.shape[0], *images[i].shape[-2:]))
                sums[i][:, y1:y2, x1:x2] += window
                counts[i][y1:y2, x1:x2] += 1
    return [total / count.to(total.device) for total, count in zip(sums, counts)]
