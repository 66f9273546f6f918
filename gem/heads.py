"""The NACLIP family of last-block heads over an open_clip ViT image tower.

All blocks but the last run as CLIP runs them; the last block's attention is replaced:

- ``naclip`` (Hajimiri et al., arXiv 2404.08181, eqs. 4-6): key-key attention
  ``softmax(k k^T / sqrt(d) + omega)``, where omega adds to patch-patch logits a Gaussian of the
  patches' grid distance, ``exp(-||p_i - p_j||^2 / (2 std^2))`` (class token row and column: 0);
  the block is *reduced*: its attention output alone, no residual, no MLP.
- ``kk``: key-key attention ``softmax(k k^T / sqrt(d))``, reduced block.
- ``sclip`` (Wang et al., arXiv 2312.01597, correlative self-attention):
  ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))`` in the vanilla block (residual + MLP).
- ``vanilla``: CLIP's own attention ``softmax(q k^T / sqrt(d))``, vanilla block (a baseline).

Positions: where the patch grid differs from the model's, these heads resample the learned grid as
their reference (DINO's convention) does, bicubic with ``scale_factor = (g + 0.1) / g0`` and no
antialiasing; GEM keeps its own (timm's) resampling.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gem.vision import GEMTokens, PatchTower, _merge_heads, _split_heads, plain_block

Tensor = torch.Tensor

HEAD_METHODS = ("naclip", "kk", "sclip", "vanilla")
REDUCED = {"naclip": True, "kk": True, "sclip": False, "vanilla": False}


def resample_positions_dino(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                            force: bool = False) -> Tensor:
    """(1 + g0h*g0w, C) class+grid embedding -> (1 + gh*gw, C), DINO/NACLIP style.

    ``F.interpolate`` is given the scale factor ``(g + 0.1) / g0`` itself (not an output size), so
    its sampling positions follow that factor; the 0.1 makes the floor land on ``g``. At the old
    grid the embedding is returned as is unless ``force`` (DINO itself skips only for a square
    input at its grid: a non-square input with that grid is resampled, slightly).
    """
    if tuple(new_grid) == tuple(old_grid) and not force:
        return pos_embed
    cls_token, grid = pos_embed[:1], pos_embed[1:]
    width = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"positional resampling gave {tuple(grid.shape[-2:])}, expected {tuple(new_grid)}")
    grid = grid.permute(0, 2, 3, 1).reshape(-1, width).to(pos_embed.dtype)
    return torch.cat((cls_token, grid), dim=0)


def neighbourhood_bias(grid: tuple[int, int], std: float) -> Tensor:
    """(1 + N, 1 + N) additive attention bias: exp(-squared grid distance / (2 std^2)) between
    patches, 0 on the class token's row and column."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    points = torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1)
    squared = torch.cdist(points, points) ** 2
    patches = torch.exp(-squared / (2.0 * std ** 2)).float()
    return F.pad(patches, (1, 0, 1, 0))


class LastBlockTower(PatchTower):
    """An open_clip ViT whose last block runs one of ``HEAD_METHODS``.

    gaussian_std: the neighbourhood's standard deviation in patches (naclip only; default 5, the
    paper's).
    """

    def __init__(self, visual: nn.Module, method: str = "naclip", gaussian_std: float = 5.0):
        super().__init__(visual, resample_positions_dino, cached_grids=17)
        if method not in HEAD_METHODS:
            raise ValueError(f"method must be one of {', '.join(HEAD_METHODS)}; got {method!r}")
        if method == "naclip" and not gaussian_std > 0:
            raise ValueError(f"gaussian_std must be positive, got {gaussian_std}")
        self.method, self.gaussian_std = method, gaussian_std
        self._bias_cache: dict[tuple, Tensor] = {}

    def _bias(self, grid: tuple[int, int], like: Tensor) -> Tensor:
        key = (grid, like.device, like.dtype)
        if key not in self._bias_cache:
            if len(self._bias_cache) > 16:
                self._bias_cache.clear()
            self._bias_cache[key] = neighbourhood_bias(grid, self.gaussian_std).to(like.device, like.dtype)
        return self._bias_cache[key]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.method == "vanilla":
            return F.scaled_dot_product_attention(q, k, v)
        if self.method == "sclip":
            return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        bias: Optional[Tensor] = self._bias(grid, k) if self.method == "naclip" else None
        return F.scaled_dot_product_attention(k, k, v, attn_mask=bias)

    def forward(self, images: Tensor) -> GEMTokens:
        """Projected tokens (B, 1 + N, D), class token first, in ``GEMTokens.gem``."""
        x, grid = self.embed(images)
        blocks = self.visual.transformer.resblocks
        for block in blocks[:-1]:
            x = plain_block(block, x)
        last = blocks[-1]
        q, k, v = _split_heads(last.attn, last.ln_1(x))
        attended = last.attn.out_proj(_merge_heads(self._attend(q, k, v, grid)))
        if REDUCED[self.method]:
            x = attended
        else:
            x = x + last.ls_1(attended)
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        tokens = self.visual.ln_post(x) @ self.visual.proj
        return GEMTokens(gem=tokens, original=None, grid=grid)

