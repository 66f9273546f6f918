"""Positional embeddings for any input size: the learned grid is resampled bicubically."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_positional_embedding(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                                  new_grid: tuple[int, int], force: bool = False) -> torch.Tensor:
    """Resample a (1 + gh*gw, C) class+grid embedding to a new (gh', gw') grid.

    Bicubic with antialiasing in float32, the class token kept as is (as timm's
    ``resample_abs_pos_embed``, which the reference GEM uses, and DINOv2 with registers). At the
    old grid the embedding is returned as is unless ``force``.
    """
    if tuple(new_grid) == tuple(old_grid) and not force:
        return pos_embed
    cls_token, grid = pos_embed[:1], pos_embed[1:]
    width = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, width).to(pos_embed.dtype)
    return torch.cat((cls_token, grid), dim=0)
