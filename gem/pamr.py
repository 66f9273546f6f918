"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020, sec. 3.2, eqs. 5-7).

For every pixel i and its 8 neighbours j at each dilation d (3x3 at spacing d, borders
replicated), the image gives an affinity

    k(i, j) = - mean_channels |I_i - I_j| / (1e-8 + 0.1 * sigma_i)
    a(i, :) = softmax_j k(i, j)

where sigma_i is the per-channel standard deviation (unbiased) of the image over the 3x3
neighbourhoods of i at all dilations, centre included once per dilation. The masks are then
averaged over the neighbourhood ``steps`` times: m_i <- sum_j a(i, j) m_j.

``refine_rows`` works on a band of rows: it needs the band plus ``halo(steps, dilations)`` rows on
either side (where the image has them) to give exact values, which is what keeps large images
within a memory budget. Shifts are summed one neighbour at a time, so no (C, P, H, W) tensor
is built; the (P, H, W) affinity is the largest buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class PAMRSettings:
    """steps: averaging iterations; dilations: neighbourhood spacings in pixels (the NACLIP
    reference uses 10 steps at dilations 8 and 16)."""

    steps: int = 10
    dilations: tuple[int, ...] = (8, 16)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"pamr steps must be >= 1, got {self.steps}")
        if not self.dilations or any(int(d) != d or d < 1 for d in self.dilations):
            raise ValueError(f"pamr dilations must be positive integers, got {list(self.dilations)}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

    @property
    def halo(self) -> int:
        """Rows of context a band needs on each side for exact values: each step reaches
        max(dilations) further."""
        return self.steps * max(self.dilations)


class _Neighbours:
    """Views of x at offsets (dy, dx) with the borders replicated: one padded copy, then slices."""

    def __init__(self, x: Tensor, reach: int):
        self.height, self.width, self.reach = x.shape[-2], x.shape[-1], reach
        flat = x.reshape(-1, 1, self.height, self.width)
        self.padded = F.pad(flat, (reach,) * 4, mode="replicate").view(*x.shape[:-2], self.height + 2 * reach,
                                                                        self.width + 2 * reach)

    def at(self, dy: int, dx: int) -> Tensor:
        top, left = self.reach + dy, self.reach + dx
        return self.padded[..., top:top + self.height, left:left + self.width]


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOURS]


def local_std(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """(K, H, W) -> (K, H, W) unbiased std over the 3x3 neighbourhoods at every dilation (centre
    counted once per dilation), two passes for accuracy."""
    offsets = [(0, 0)] * len(dilations) + _offsets(dilations)
    shifted = _Neighbours(image, max(dilations))
    mean = sum(shifted.at(dy, dx) for dy, dx in offsets) / len(offsets)
    squares = sum((shifted.at(dy, dx) - mean) ** 2 for dy, dx in offsets)
    return (squares / (len(offsets) - 1)).sqrt()


def affinity(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """(K, H, W) image -> (P, H, W) neighbour weights summing to 1 over P = 8 * len(dilations)."""
    scale = 1e-8 + 0.1 * local_std(image, dilations)
    shifted = _Neighbours(image, max(dilations))
    logits = torch.stack([(-(image - shifted.at(dy, dx)).abs() / scale).mean(dim=0)
                          for dy, dx in _offsets(dilations)])
    return torch.softmax(logits, dim=0)


def refine(image: Tensor, masks: Tensor, settings: PAMRSettings = PAMRSettings()) -> Tensor:
    """(K, H, W) image and (C, H, W) masks (logits or probabilities) at the same size -> refined
    (C, H, W). Runs on the tensors' device."""
    if image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"PAMR needs the image and masks at one size, got {tuple(image.shape[-2:])} "
                         f"and {tuple(masks.shape[-2:])}")
    weights = affinity(image.float(), settings.dilations)
    offsets = _offsets(settings.dilations)
    masks = masks.float()
    for _ in range(settings.steps):
        refined = torch.zeros_like(masks)
        shifted = _Neighbours(masks, max(settings.dilations))
        for weight, (dy, dx) in zip(weights, offsets):
            refined.addcmul_(shifted.at(dy, dx), weight)
        masks = refined
    return masks
