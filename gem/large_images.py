"""SAM refinement of large images at a bounded working size (``SAMRefineSettings.max_pixels``).

SAM's masks come from 256 x 256 logits and the coarse map from the model's grid, so refining a
12 MP photo at its own size buys nothing but (classes, H, W) score maps of gigabytes: an image
over the cap is refined at ``working_size`` and its map taken back to the image's size by
``nearest_bands``, band by band.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from gem.postprocess import BACKGROUND

Tensor = torch.Tensor


def working_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is refined at: its own, or with more than ``max_pixels`` pixels (0: no
    cap) scaled down to about that many, aspect ratio kept."""
    if not max_pixels or height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def resized_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 image at ``size`` (height, width): itself, or OpenCV's area resize."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    import cv2
    return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_AREA)


def nearest_bands(bands: Iterator[tuple[int, Tensor, Tensor]], work: tuple[int, int], size: tuple[int, int],
                  rows: int = 256) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first row, probability, class) bands of a map refined at ``work`` -> the same at ``size``,
    each pixel taking its nearest working pixel's values (``F.interpolate``'s ``nearest``); the
    working map is held whole (it is at most ``max_pixels``), the full-size one band by band."""
    parts = list(bands)
    prob = torch.cat([p for _, p, _ in parts]) if parts else torch.zeros(work)
    cls = torch.cat([c for _, _, c in parts]) if parts else torch.full(work, BACKGROUND)
    (work_h, work_w), (height, width) = work, size
    cols = (torch.arange(width, device=prob.device) * (work_w / width)).long().clamp_(max=work_w - 1)
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        index = (torch.arange(start, stop, device=prob.device) * (work_h / height)).long().clamp_(max=work_h - 1)
        yield start, prob[index][:, cols], cls[index][:, cols]
