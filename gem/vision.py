"""GEM over an open_clip ViT image tower: the original path and the GEM path in one pass.

The first ``layers - (depth - 1)`` blocks run unchanged. From there on every block feeds
two streams (paper, Fig. 2): the original path (attention + MLP, as CLIP runs it) and the
GEM path, which adds to its own residual stream the self-self attention of the *original*
path's ln_1 tokens, projected by the block's out_proj and with no MLP. Both streams end in
ln_post and proj, giving patch tokens in the joint image-text space.

The blocks are driven from their weights (ln_1, in_proj, out_proj, ls_1, ln_2, mlp, ls_2)
rather than through ``nn.MultiheadAttention``, so layout (batch first or not) and the
attention kernel are ours to choose. The wrapped model is not modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gem.positional import resample_positional_embedding
from gem.self_self_attention import (adaptive_inverse_temperature, self_self_attention,
                                     self_self_attention_naive)

Tensor = torch.Tensor

SUPPORTED_MODELS_HINT = (
    "GEM supports open_clip CLIP models whose image tower is open_clip's VisionTransformer "
    "with standard attention blocks and no attentional pooler: OpenAI, LAION, MetaCLIP, DFN "
    "and -quickgelu ViT variants such as ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, "
    "ViT-bigG-14"
)


class UnsupportedModelError(ValueError):
    """The model is not an open_clip ViT that GEM can wrap."""


@dataclass
class GEMTokens:
    """Projected tokens (B, prefix + gh*gw, D) before normalisation: ``prefix`` leading tokens
    (the class token; none for ProxyCLIP, whose output has no class token), then the grid's."""

    gem: Tensor
    original: Optional[Tensor]
    grid: tuple[int, int]
    prefix: int = 1

    @property
    def patches(self) -> Tensor:
        """(B, gh*gw, D): the grid's tokens of ``gem``."""
        return self.gem[:, self.prefix:]


def check_supported(visual: nn.Module) -> None:
    """Raise UnsupportedModelError unless ``visual`` is a plain open_clip ViT."""
    from gem.torchvision_shim import import_torchvision
    import_torchvision()
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(f"{SUPPORTED_MODELS_HINT}; got image tower {type(visual).__name__}.")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{SUPPORTED_MODELS_HINT}; this ViT has an attentional pooler (CoCa-style).")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention) \
                or block.attn.in_proj_weight is None or hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(
                f"{SUPPORTED_MODELS_HINT}; block {type(block).__name__} uses custom attention.")
    if visual.proj is None:
        raise UnsupportedModelError(f"{SUPPORTED_MODELS_HINT}; this ViT has no output projection.")


def _split_heads(attn: nn.MultiheadAttention, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    batch, tokens, width = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def plain_block(block: nn.Module, x: Tensor) -> Tensor:
    """One CLIP residual block as open_clip runs it (attention through SDPA): the blocks that a
    last-block method (NACLIP family, ProxyCLIP) leaves as they are."""
    q, k, v = _split_heads(block.attn, block.ln_1(x))
    x = x + block.ls_1(block.attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def embed_patches(visual: nn.Module, images: Tensor,
                  positions: Callable[[tuple[int, int], torch.dtype], Tensor]) -> tuple[Tensor, tuple[int, int]]:
    """Patchify, prepend the class token, add ``positions(grid, dtype)``, ln_pre: (B, 1 + gh*gw, C).
    The towers differ only in how they resample the positional embedding to the grid."""
    x = visual.conv1(images)
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat((cls, x), dim=1) + positions(grid, x.dtype)
    return visual.ln_pre(x), grid


def _attention_naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return weights @ v


Resampler = Callable[[Tensor, tuple[int, int], tuple[int, int]], Tensor]
"""``(pos_embed, old_grid, new_grid) -> pos_embed``: the class+grid embedding on the new grid."""


class PatchTower(nn.Module):
    """An open_clip ViT's patch grid and positional embedding, shared by the GEM and last-block
    towers, which differ only in how the learned grid is resampled (each as its reference does).

    resample: a ``Resampler``; cached_grids: how many resampled embeddings (per grid, device, dtype
    and parameter version) to keep before the cache is emptied.
    """

    def __init__(self, visual: nn.Module, resample: Resampler, cached_grids: int):
        super().__init__()
        check_supported(visual)
        self.visual = visual
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)
        self._resample = resample
        self._cached_grids = cached_grids
        self._pos_cache: dict[tuple, Tensor] = {}

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def _positional_embedding(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        pos = self.visual.positional_embedding
        key = (grid, pos.device, dtype, pos._version)
        if key not in self._pos_cache:
            if len(self._pos_cache) >= self._cached_grids:
                self._pos_cache.clear()
            resampled = self._resample(pos.detach(), tuple(self.visual.grid_size), grid)
            self._pos_cache[key] = resampled.to(dtype)
        return self._pos_cache[key]

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        return embed_patches(self.visual, images, self._positional_embedding)


class GEMVisionTower(PatchTower):
    """Dual-path forward over an open_clip ``VisionTransformer``.

    depth: GEM acts on the last ``depth - 1`` blocks (paper default 7).
    iters: self-self clustering iterations (default 1).
    inv_temperature: None for the adaptive per-image value, else a fixed multiplier of the
        cosine similarities (the reference's ``ss_attn_temp``).
    fast: SDPA kernels (True) or the explicit-matrix reference path (False).
    """

    def __init__(self, visual: nn.Module, depth: int = 7, iters: int = 1,
                 inv_temperature: Optional[float] = None, fast: bool = True):
        super().__init__(visual, resample_positional_embedding, cached_grids=1)
        layers = len(visual.transformer.resblocks)
        if not 1 <= depth <= layers:
            raise ValueError(f"depth must be between 1 and the number of blocks ({layers}), got {depth}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        if inv_temperature is not None and inv_temperature <= 0:
            raise ValueError(f"inv_temperature must be positive or None (adaptive), got {inv_temperature}")
        self.depth, self.iters, self.inv_temperature = depth, iters, inv_temperature
        self.num_gem_blocks = depth - 1
        self._attention: Callable = F.scaled_dot_product_attention if fast else _attention_naive
        self._self_self: Callable = self_self_attention if fast else self_self_attention_naive

    def _original_block(self, block: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        x = x + block.ls_1(block.attn.out_proj(_merge_heads(self._attention(q, k, v))))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _project(self, x: Tensor) -> Tensor:
        return self.visual.ln_post(x) @ self.visual.proj

    def forward(self, images: Tensor, keep_original: bool = False) -> GEMTokens:
        x, grid = self.embed(images)
        blocks = self.visual.transformer.resblocks
        first_gem = len(blocks) - self.num_gem_blocks
        for block in blocks[:first_gem]:
            x = self._original_block(block, x, *_split_heads(block.attn, block.ln_1(x)))
        x_gem = x
        for index, block in enumerate(blocks[first_gem:], start=first_gem):
            h = block.ln_1(x)
            q, k, v = _split_heads(block.attn, h)
            inv_temp = self.inv_temperature
            if inv_temp is None:
                inv_temp = adaptive_inverse_temperature(h, q.shape[-1])
            gem_update = self._self_self(q, k, v, inv_temp, self.iters)
            x_gem = x_gem + block.ls_1(block.attn.out_proj(_merge_heads(gem_update)))
            # The last block's original attention and MLP feed only the original output.
            if index < len(blocks) - 1 or keep_original:
                x = self._original_block(block, x, q, k, v)
        original = self._project(x) if keep_original else None
        return GEMTokens(gem=self._project(x_gem), original=original, grid=grid)
