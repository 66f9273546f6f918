"""ProxyCLIP (Lan et al., ECCV 2024, arXiv 2408.04883): CLIP's last block attends with a VFM's features.

All CLIP blocks but the last run as CLIP runs them. The last one is replaced by *proxy attention*
(paper, sec. 3.2): the VFM's patch features of the same crop, L2-normalised, give the cosine
similarities S (N x N over the VFM's N patches); adaptive normalisation and masking turn them into

    A = softmax(gamma * (S - beta * mean(S)))   with every negative entry set to -inf first,

one matrix shared by all CLIP heads. It is applied to CLIP's own values (the block's ``ln_1`` and
the value third of its in-projection, class token dropped), resized bilinearly from CLIP's patch
grid to the VFM's, then ``out_proj``; no residual, no MLP. ``ln_post`` and ``proj`` follow, so the
dense output is on the VFM's grid (DINO ViT/8 at a 224 crop: 28 x 28, where CLIP ViT/16 has 14).

mean(S) is per image here. The reference takes it over its whole batch tensor, but only ever runs
one crop (its sliding window sends them one at a time, its post-processing takes batch 1): per-image
means give its numbers and let crops share forwards. CLIP's positions are resampled as the reference's
bundled open_clip does (DINO's convention, ``gem.heads.resample_positions_dino``); the learned grid is
used as is only for a square input at the native grid.

Reference quirks reproduced unless ``fix_nonsquare``: the VFM grid is taken from the crop's height for
both sides (DINO's tokens are then read as a height x height grid, folding tokens into channels for a
non-square crop; DINOv2's would fail, so that raises here), and CLIP's value tokens are read as a
(W/p) x (H/p) grid, transposed for non-square crops. Square crops (every sliding window once the image
covers a crop each way) are unaffected.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gem.heads import resample_positions_dino
from gem.vfm import VFMFeatures, renormalise
from gem.vision import GEMTokens, PatchTower, embed_patches, plain_block

Tensor = torch.Tensor


def proxy_attention(features: Tensor, beta: float = 1.2, gamma: float = 3.0) -> Tensor:
    """(B, C, I, J) VFM features -> (B, N, N) attention over the N = I*J patches (row-major), rows
    summing to 1. In float32 whatever the autocast: the masking depends on the sign of
    ``S - beta * mean(S)``. A row is NaN only if all its entries are masked, which needs a mean
    cosine above 1 / beta (the reference's NaN too)."""
    with torch.autocast(features.device.type, enabled=False):
        tokens = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)
        similarity = tokens @ tokens.transpose(1, 2)
        logits = gamma * (similarity - beta * similarity.mean(dim=(1, 2), keepdim=True))
        logits = logits.masked_fill(logits < 0, float("-inf"))
        return torch.softmax(logits, dim=-1)


def value_grid(values: Tensor, grid: tuple[int, int], out_grid: tuple[int, int], transposed: bool) -> Tensor:
    """(B, gh*gw, C) value tokens (row-major over CLIP's grid) -> (B, I*J, C) on ``out_grid``
    (bilinear, align_corners False). ``transposed``: read the tokens as a (gw, gh) grid, as the
    reference does (the same for square grids)."""
    batch, _, channels = values.shape
    rows, cols = (grid[1], grid[0]) if transposed else grid
    maps = values.transpose(1, 2).reshape(batch, channels, rows, cols)
    if (rows, cols) != tuple(out_grid):
        maps = F.interpolate(maps, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


class ProxyCLIPTower(PatchTower):
    """An open_clip ViT whose last block runs proxy attention from ``vfm`` (None: the last block
    unchanged, CLIP's plain dense output).

    clip_mean, clip_std: the normalisation of the images this tower is given; the VFM sees the same
    pixels under its own (``vfm.mean``, ``vfm.std``). beta, gamma: the paper's 1.2 and 3.0.
    fix_nonsquare: each crop's own VFM grid and CLIP's value grid the right way round (see the module).
    """

    def __init__(self, visual: nn.Module, vfm: Optional[VFMFeatures], clip_mean: Sequence[float],
                 clip_std: Sequence[float], beta: float = 1.2, gamma: float = 3.0, fix_nonsquare: bool = False):
        super().__init__(visual, resample_positions_dino, cached_grids=17)
        if not (beta > 0 and gamma > 0):
            raise ValueError(f"beta and gamma must be positive, got {beta}, {gamma}")
        self.vfm = vfm
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.beta, self.gamma, self.fix_nonsquare = beta, gamma, fix_nonsquare

    def _positions(self, grid: tuple[int, int], square: bool, dtype: torch.dtype) -> Tensor:
        pos = self.visual.positional_embedding
        key = (grid, square, pos.device, dtype, pos._version)
        if key not in self._pos_cache:
            if len(self._pos_cache) >= self._cached_grids:
                self._pos_cache.clear()
            resampled = resample_positions_dino(pos.detach(), tuple(self.visual.grid_size), grid, force=not square)
            self._pos_cache[key] = resampled.to(dtype)
        return self._pos_cache[key]

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        square = images.shape[-2] == images.shape[-1]
        return embed_patches(self.visual, images, lambda grid, dtype: self._positions(grid, square, dtype))

    def vfm_features(self, images: Tensor) -> Tensor:
        """(B, C, I, J) proxy features of the CLIP-normalised ``images`` on the grid the attention
        uses: the VFM's own, or the reference's height x height reading (see the module)."""
        features = self.vfm(renormalise(images, self.clip_mean, self.clip_std, self.vfm.mean, self.vfm.std))
        height, width = images.shape[-2:]
        if self.fix_nonsquare or self.vfm.family == "sam" or height == width:
            return features
        if self.vfm.family == "dinov2":
            raise ValueError(f"ProxyCLIP with DINOv2 fails on non-square crops in the reference ({height} x {width}: "
                             "its grid is taken from the height); set fix_nonsquare to use each crop's own grid")
        side = height // self.vfm.patch_size[0]
        tokens = features.flatten(2).transpose(1, 2)
        if tokens.shape[1] * tokens.shape[2] % (side * side):
            raise ValueError(f"a {height} x {width} crop cannot be read as the reference's {side} x {side} DINO grid; "
                             "set fix_nonsquare to use each crop's own grid")
        return tokens.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)

    def forward(self, images: Tensor) -> GEMTokens:
        """Projected patch tokens (B, I*J, D), no class token (``GEMTokens.prefix`` 0), on the
        VFM's grid (``GEMTokens.grid``); CLIP's grid without a VFM."""
        x, grid = self.embed(images)
        blocks = self.visual.transformer.resblocks
        for block in blocks[:-1]:
            x = plain_block(block, x)
        last = blocks[-1]
        if self.vfm is None:
            x = plain_block(last, x)
            return GEMTokens(gem=self.visual.ln_post(x[:, 1:]) @ self.visual.proj, original=None, grid=grid, prefix=0)
        features = self.vfm_features(images)
        out_grid = (features.shape[2], features.shape[3])
        attention = proxy_attention(features, self.beta, self.gamma)
        width, bias = x.shape[-1], last.attn.in_proj_bias
        values = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], None if bias is None else bias[2 * width:])
        values = value_grid(values[:, 1:], grid, out_grid, transposed=not self.fix_nonsquare)
        x = last.attn.out_proj(attention.to(values.dtype) @ values)
        return GEMTokens(gem=self.visual.ln_post(x) @ self.visual.proj, original=None, grid=out_grid, prefix=0)
