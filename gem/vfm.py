"""Vision foundation models (VFMs) as ProxyCLIP's proxies: patch features on the VFM's own grid.

DINO ViTs and DINOv2 ViTs with registers are timm's ``VisionTransformer`` (timm defines both
recipes); SAM's image encoder is segment-anything's. Each gives the last block's tokens after the
final norm, class and register tokens dropped, as (B, C, gh, gw): what ProxyCLIP reads from
DINO's ``get_intermediate_layers(n=1)`` and DINOv2's ``get_intermediate_layers(reshape=True)``.

The blocks are timm's, run in order; the token embedding is ours, because each reference
resamples its positional embedding its own way and timm's dynamic size does neither exactly:

- DINO: bicubic with ``scale_factor = (g + 0.1) / g0`` (no antialias), as ``gem.heads`` does;
- DINOv2 with registers: bicubic to exactly (gh, gw) with antialias (``interpolate_offset`` 0).

Both use the learned grid as is only for a square input at the native grid (a non-square input
whose grid happens to be native is still resampled, as the references do). SAM's encoder has a
fixed 1024 input: the image is resized to it (bilinear) and its 64 x 64 grid is the output grid.

The VFM has its own input normalisation (ImageNet's for all three); ``renormalise`` maps CLIP's
normalised input to it, which is how ProxyCLIP feeds the VFM the same crop.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gem.heads import resample_positions_dino
from gem.loading import RANDOM_WEIGHTS, WeightsUnavailableError, _hf_host, _hub_offline, _reachable
from gem.positional import resample_positional_embedding
from gem.settings import IMAGENET_MEAN, IMAGENET_STD, VFM_NAMES, VFMSettings
from gem.torchvision_shim import import_torchvision

Tensor = torch.Tensor
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VFMArch:
    """family: dino | dinov2 | sam; arch: timm's architecture name (SAM: its size); hub: timm's
    pretrained tag (SAM: unused, Meta's checkpoint); img_size: the native input side."""

    family: str
    arch: str
    hub: str
    img_size: int


VFM_ARCHS: dict[str, VFMArch] = {
    "dino_vitb8": VFMArch("dino", "vit_base_patch8_224", "vit_base_patch8_224.dino", 224),
    "dino_vitb16": VFMArch("dino", "vit_base_patch16_224", "vit_base_patch16_224.dino", 224),
    "dinov2_vitb14_reg": VFMArch("dinov2", "vit_base_patch14_reg4_dinov2",
                                 "vit_base_patch14_reg4_dinov2.lvd142m", 518),
    "dinov2_vitl14_reg": VFMArch("dinov2", "vit_large_patch14_reg4_dinov2",
                                 "vit_large_patch14_reg4_dinov2.lvd142m", 518),
    "sam_vit_b": VFMArch("sam", "vit_b", "", 1024),
    "sam_vit_l": VFMArch("sam", "vit_l", "", 1024),
    "sam_vit_h": VFMArch("sam", "vit_h", "", 1024),
}
assert tuple(VFM_ARCHS) == VFM_NAMES  # gem.settings validates names without importing torch


def renormalise(images: Tensor, from_mean: Sequence[float], from_std: Sequence[float],
                to_mean: Sequence[float] = IMAGENET_MEAN, to_std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """(B, 3, H, W) normalised with (from_mean, from_std) -> the same pixels normalised with
    (to_mean, to_std): un-normalise, then normalise, per channel."""
    def column(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    pixels = images * column(from_std) + column(from_mean)
    return (pixels - column(to_mean)) / column(to_std)


class VFMFeatures(nn.Module):
    """A VFM's patch features: ``forward`` maps (B, 3, H, W) images, normalised with ``mean`` and
    ``std``, to (B, C, gh, gw), the last block's patch tokens after the final norm.

    model: a timm ``VisionTransformer`` (family dino or dinov2) or a segment-anything ``Sam``
    (family sam; only its image encoder is used)."""

    def __init__(self, model: nn.Module, family: str, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if family not in ("dino", "dinov2", "sam"):
            raise ValueError(f"VFM family must be dino, dinov2 or sam; got {family!r}")
        self.model, self.family = model, family
        self.mean, self.std = tuple(mean), tuple(std)
        self._pos_cache: dict[tuple, Tensor] = {}
        if family == "sam":
            encoder = model.image_encoder
            self.patch_size = tuple(encoder.patch_embed.proj.kernel_size)
            self.native_grid = (encoder.img_size // self.patch_size[0],) * 2
        else:
            self.patch_size = tuple(model.patch_embed.patch_size)
            self.native_grid = tuple(model.patch_embed.grid_size)

    @property
    def dim(self) -> int:
        if self.family == "sam":
            return self.model.image_encoder.neck[0].out_channels
        return self.model.embed_dim

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The output grid for an input of (height, width) (SAM's is fixed)."""
        if self.family == "sam":
            return self.native_grid
        return height // self.patch_size[0], width // self.patch_size[1]

    def positional_embedding(self, grid: tuple[int, int], square: bool) -> Tensor:
        """(gh*gw, D) positions of the patch tokens at ``grid`` (the class token's, where the
        model adds one, are ``class_position``), resampled as the model's reference does."""
        pos = self.model.pos_embed
        key = (tuple(grid), square, pos.device, pos.dtype, pos._version)
        if key not in self._pos_cache:
            if len(self._pos_cache) > 16:
                self._pos_cache.clear()
            force = not square
            table = pos.detach()[0]
            if self.family == "dino":  # class row first, DINO's resampling
                grid_rows = resample_positions_dino(table, self.native_grid, grid, force=force)[1:]
            else:  # timm keeps DINOv2's class position in its class token: the table is the grid alone
                with_class = torch.cat((table.new_zeros(1, table.shape[1]), table))
                grid_rows = resample_positional_embedding(with_class, self.native_grid, grid, force=force)[1:]
            self._pos_cache[key] = grid_rows
        return self._pos_cache[key]

    def class_position(self) -> Optional[Tensor]:
        """The class token's positional embedding where it is separate (DINO), else None (timm
        folds DINOv2's into the class token)."""
        return None if self.model.no_embed_class else self.model.pos_embed.detach()[0, :1]

    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        m = self.model
        x = m.patch_embed.proj(images)
        grid = (x.shape[2], x.shape[3])
        x = m.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = self.positional_embedding(grid, images.shape[-2] == images.shape[-1]).to(x.dtype)
        batch = x.shape[0]
        prefix = [m.cls_token.expand(batch, -1, -1)]
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(batch, -1, -1))
        if m.no_embed_class:  # DINOv2 with registers: positions on the patches, then the prefix
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + torch.cat((self.class_position(), pos)).to(x.dtype)
        return m.norm_pre(x), grid

    def forward(self, images: Tensor) -> Tensor:
        if self.family == "sam":
            encoder = self.model.image_encoder
            size = (encoder.img_size, encoder.img_size)
            if tuple(images.shape[-2:]) != size:
                images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            return encoder(images)
        x, grid = self._embed(images)
        for block in self.model.blocks:
            x = block(x)
        x = self.model.norm(x)[:, self.model.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def _timm():
    import_torchvision()  # timm imports torchvision, whose ops may not match this torch
    import timm
    return timm


def _timm_kwargs(arch: VFMArch, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {"img_size": arch.img_size, "num_classes": 0, **dict(overrides)}


def build_vfm(name: str, arch: Optional[Mapping[str, Any]] = None, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> VFMFeatures:
    """A VFM with random weights, at its published size or with ``arch``'s overrides (timm's
    VisionTransformer arguments: embed_dim, depth, num_heads, patch_size, img_size...; SAM:
    ``gem.sam.sam_arch``'s keys)."""
    if name not in VFM_ARCHS:
        raise ValueError(f"unknown VFM {name!r}; known: {', '.join(VFM_ARCHS)}")
    spec = VFM_ARCHS[name]
    if spec.family == "sam":
        from gem.sam import build_sam
        return VFMFeatures(build_sam(spec.arch, arch), "sam", mean, std)
    model = _timm().create_model(spec.arch, pretrained=False, **_timm_kwargs(spec, arch or {}))
    return VFMFeatures(model.eval(), spec.family, mean, std)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def convert_state_dict(state: Mapping[str, Tensor], features: VFMFeatures) -> dict[str, Tensor]:
    """A DINO / DINOv2 state dict with the original repositories' key names (or timm's) -> timm's,
    in float32: DINOv2's ``register_tokens`` become ``reg_token``, its class position moves into
    the class token, ``mask_token`` goes (timm's own ``checkpoint_filter_fn``); DINO's names are
    timm's already. ``module.`` / ``backbone.`` prefixes of training checkpoints are dropped."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key.startswith("head."):
            continue
        cleaned[key] = value.float() if value.is_floating_point() else value
    return checkpoint_filter_fn(cleaned, features.model)


def _hub_cached(spec: VFMArch) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(f"timm/{spec.hub}", name), str)
               for name in ("model.safetensors", "pytorch_model.bin"))


def _offline_message(settings: VFMSettings, spec: VFMArch, host: Optional[str], detail: str) -> str:
    return (f"could not fetch the VFM weights {spec.hub} ({settings.name}): no network access to {host} and no "
            f"cached copy ({detail}). Download them elsewhere and pass the checkpoint's local path as the VFM "
            f"weights (vfm.weights: /path/to/model.safetensors; timm's or the original {spec.family.upper()} key "
            f"names), or weights: none for random weights")


def check_vfm_weights(settings: VFMSettings) -> None:
    """Fail in about a second, without building the model, wherever ``load_vfm`` would fail to get
    weights: a missing file, or hub weights with no network and no cached copy."""
    spec, weights = VFM_ARCHS[settings.name], settings.weights
    if spec.family == "sam":
        from gem.sam import check_sam_weights
        check_sam_weights(spec.arch, weights)
    elif weights is None or weights.lower() in RANDOM_WEIGHTS:
        return
    elif weights != "hub":
        if not os.path.isfile(weights):
            raise WeightsUnavailableError(f"VFM weights {weights!r}: no such file; pass a local checkpoint path, "
                                          f"'hub' (timm's {spec.hub}) or 'none'")
    elif not _reachable(_hf_host()) and not _hub_cached(spec):
        raise WeightsUnavailableError(_offline_message(settings, spec, _hf_host(), "not in the hub cache"))


def load_vfm(settings: VFMSettings, device: str | torch.device = "cpu") -> VFMFeatures:
    """The VFM ``settings`` name, in eval mode on ``device``, with its weights: ``hub`` (timm's
    published weights from the Hugging Face hub cache; SAM: Meta's checkpoint), a local checkpoint,
    or none/random. Offline without a cached copy: ``WeightsUnavailableError`` saying what to pass."""
    spec = VFM_ARCHS[settings.name]
    weights = settings.weights
    if spec.family == "sam":
        from gem.sam import load_sam
        sam = load_sam(spec.arch, weights, settings.arch, device)
        return VFMFeatures(sam, "sam", settings.mean, settings.std).eval()
    if weights is None or weights.lower() in RANDOM_WEIGHTS:
        log.warning("VFM %s has random weights (weights=%r): ProxyCLIP's outputs are meaningless",
                    settings.name, weights)
        return build_vfm(settings.name, settings.arch, settings.mean, settings.std).to(device)
    if weights == "hub":
        host = _hf_host()
        try:
            with _hub_offline(not _reachable(host)):
                model = _timm().create_model(spec.hub, pretrained=True, **_timm_kwargs(spec, settings.arch))
        except Exception as err:  # huggingface_hub, urllib and timm raise many kinds
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise WeightsUnavailableError(_offline_message(settings, spec, host, detail)) from None
        return VFMFeatures(model.eval(), spec.family, settings.mean, settings.std).to(device)
    if not os.path.isfile(weights):
        raise WeightsUnavailableError(f"VFM weights {weights!r}: no such file; pass a local checkpoint path, "
                                      f"'hub' (timm's {spec.hub}) or 'none'")
    features = build_vfm(settings.name, settings.arch, settings.mean, settings.std)
    try:
        features.model.load_state_dict(convert_state_dict(_read_state_dict(weights), features))
    except (RuntimeError, OSError, KeyError) as err:
        raise WeightsUnavailableError(f"could not load VFM {settings.name} weights from {weights}: "
                                      f"{str(err).splitlines()[0][:200]}") from err
    return features.eval().to(device)
