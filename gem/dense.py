"""From dense word logits to class probabilities, at the image's own size, in bands of rows.

The model side gives, per image, cosine similarities of every vocabulary *word* (class names,
their synonyms, background names) on some grid: the patch grid (whole-image inference) or the
resized image (sliding windows, ``gem.windows``). This module takes them to the original
resolution one band of rows at a time (bilinear, as ``F.interpolate``), optionally refines
them with PAMR against the image (each band with its halo of context rows, so the values are
those of a whole-image PAMR), and turns them into class probabilities:

    p_word = softmax(logit_scale * logits) over all words
    p_class = max over the class's words;  background names form one more, never-written class
    p_class /= sum over classes (including background)

A pixel is background when its most probable class is the background class, or when that
class's probability (before renormalising) is below the threshold (NACLIP's ``prob_thd``).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from gem.pamr import PAMRSettings, refine

Tensor = torch.Tensor
BACKGROUND = -1


def bilinear_rows(x: Tensor, size: tuple[int, int], start: int, stop: int) -> Tensor:
    """Rows [start, stop) of ``F.interpolate(x[None], size, mode='bilinear')[0]`` for (C, h, w) x,
    without computing the others."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x[:, start:stop].float()
    out_h, out_w = size
    xs = (torch.arange(out_w, dtype=torch.float32, device=x.device) + 0.5) * (2.0 / out_w) - 1.0
    ys = (torch.arange(start, stop, dtype=torch.float32, device=x.device) + 0.5) * (2.0 / out_h) - 1.0
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def class_probabilities(logits: Tensor, word_class: Tensor, num_groups: int, logit_scale: float) -> Tensor:
    """(words, ...) cosine similarities -> (num_groups, ...) probabilities before renormalising:
    softmax over all words at ``logit_scale``, then each group's max over its words."""
    word_probs = torch.softmax(logits.float() * logit_scale, dim=0)
    if word_probs.shape[0] == num_groups and bool((word_class == torch.arange(num_groups, device=word_class.device)).all()):
        return word_probs
    index = word_class.to(word_probs.device).view(-1, *([1] * (word_probs.dim() - 1))).expand_as(word_probs)
    groups = word_probs.new_zeros((num_groups, *word_probs.shape[1:]))
    return groups.scatter_reduce_(0, index, word_probs, reduce="amax", include_self=True)


def renormalise(probs: Tensor) -> Tensor:
    return probs / probs.sum(dim=0, keepdim=True)


def decide(probs: Tensor, num_classes: int, threshold: float) -> tuple[Tensor, Tensor]:
    """(groups, ...) probabilities before renormalising -> (top renormalised probability, class
    id or BACKGROUND). Group ``num_classes`` (if present) is the background names'."""
    top_prob, top_class = probs.max(dim=0)
    background = (top_prob < threshold) | (top_class >= num_classes)
    top_class = torch.where(background, torch.full_like(top_class, BACKGROUND), top_class)
    return top_prob / probs.sum(dim=0), top_class


def top_class_bands(logits: Tensor, size: tuple[int, int], word_class: Tensor, num_classes: int,
                    logit_scale: float, threshold: float, pamr: Optional[PAMRSettings] = None,
                    image: Optional[Tensor] = None, max_elements: int = 1 << 25,
                    band_rows: Optional[int] = None
                    ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (first row, top probability (rows, W) float32, class id or -1 (rows, W) int64) bands
    covering an image of ``size`` (height, width), on the logits' device.

    logits: (words, h, w) on any grid covering the image; image: (3, h', w') the model's input,
    upsampled with the logits for PAMR. ``max_elements`` sizes the bands: the largest per-band
    buffer (PAMR's (8 * dilations, rows, W) affinity, or the (words, rows, W) logits, halo rows
    included) holds about that many floats, and peak memory is a small multiple of it, whatever
    the image's size; bands are at least twice the halo tall, so halos at most double the work.
    ``band_rows`` sets the band height instead.
    """
    height, width = size
    num_words = logits.shape[0]
    groups = num_classes + int(bool((word_class >= num_classes).any()))
    halo = pamr.halo if pamr is not None else 0
    per_row = width * max(num_words + 3, 8 * len(pamr.dilations) if pamr else 1)
    rows = band_rows or max(1, 2 * halo, max_elements // per_row - 2 * halo)  # halos at most double the work
    if pamr is not None and image is None:
        raise ValueError("PAMR needs the image")
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        low, high = max(0, start - halo), min(height, stop + halo)
        band = bilinear_rows(logits, size, low, high)
        if pamr is not None:
            band = refine(bilinear_rows(image, size, low, high), band, pamr)
        band = band[:, start - low:stop - low]
        probs = class_probabilities(band, word_class, groups, logit_scale)
        top_prob, top_class = decide(probs, num_classes, threshold)
        yield start, top_prob, top_class
