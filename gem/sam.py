"""Segment Anything models from the ``segment-anything`` package, at the published sizes or any other.

``build_sam`` makes segment-anything's own ``Sam`` (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder(TwoWayTransformer)``) with every argument as its ``build_sam`` passes them, any of
which ``arch`` may override, so tests can build a tiny SAM that loads a fixture's state dict.
``load_sam`` adds the weights: Meta's published checkpoint (``hub``, kept in torch's hub cache), a
local file, or none. Offline without a cached checkpoint it fails at once, naming what to pass.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import torch

from gem.loading import RANDOM_WEIGHTS, WeightsUnavailableError, _reachable
from gem.torchvision_shim import import_torchvision

log = logging.getLogger(__name__)

SAM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
}
# What segment-anything's _build_sam fixes for every size.
SAM_COMMON: dict[str, Any] = dict(
    image_size=1024, vit_patch_size=16, mlp_ratio=4, window_size=14, prompt_embed_dim=256, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_depth=3, iou_head_hidden_dim=256,
    num_multimask_outputs=3)
SAM_CHECKPOINTS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}


def _modeling():
    import_torchvision()  # segment_anything's transforms import torchvision
    from segment_anything import modeling
    return modeling


def sam_arch(model: str, arch: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The full argument set of a SAM: the named size's, then ``arch``'s overrides."""
    if model not in SAM_ARCHS:
        raise ValueError(f"SAM model must be one of {', '.join(SAM_ARCHS)}; got {model!r}")
    merged = {**SAM_COMMON, **SAM_ARCHS[model], **dict(arch or {})}
    unknown = set(merged) - set(SAM_COMMON) - set(SAM_ARCHS[model])
    if unknown:
        raise ValueError(f"unknown SAM arch keys {sorted(unknown)}; known: {sorted(set(SAM_COMMON) | set(SAM_ARCHS[model]))}")
    return merged


def build_sam(model: str = "vit_b", arch: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """segment-anything's ``Sam`` with random weights, in eval mode."""
    m, a = _modeling(), sam_arch(model, arch)
    embedding = a["image_size"] // a["vit_patch_size"]
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=a["encoder_depth"], embed_dim=a["encoder_embed_dim"], img_size=a["image_size"],
            mlp_ratio=a["mlp_ratio"], norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a["encoder_num_heads"], patch_size=a["vit_patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=list(a["encoder_global_attn_indexes"]), window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"]),
        prompt_encoder=m.PromptEncoder(
            embed_dim=a["prompt_embed_dim"], image_embedding_size=(embedding, embedding),
            input_image_size=(a["image_size"], a["image_size"]), mask_in_chans=a["mask_in_chans"]),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=a["num_multimask_outputs"],
            transformer=m.TwoWayTransformer(depth=a["decoder_depth"], embedding_dim=a["prompt_embed_dim"],
                                            mlp_dim=a["decoder_mlp_dim"], num_heads=a["decoder_num_heads"]),
            transformer_dim=a["prompt_embed_dim"], iou_head_depth=a["iou_head_depth"],
            iou_head_hidden_dim=a["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def _checkpoint_path(model: str, weights: str, download: bool = True) -> str:
    """A local file for ``weights``: the path itself, or Meta's checkpoint in torch's hub cache
    (downloaded if the host answers and ``download``)."""
    if weights != "hub":
        if not os.path.isfile(weights):
            raise WeightsUnavailableError(f"SAM weights {weights!r}: no such file; pass a local SAM checkpoint "
                                          f"(e.g. sam_{model}.pth), 'hub' or 'none'")
        return weights
    url = SAM_CHECKPOINTS[model]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.isfile(path):
        return path
    if not _reachable(urlparse(url).hostname):
        raise WeightsUnavailableError(
            f"SAM {model} weights are not cached ({path}) and {urlparse(url).hostname} cannot be reached: download "
            f"{url} elsewhere and pass its local path as the SAM weights (e.g. sam.weights: /path/to/"
            f"{os.path.basename(url)})")
    if not download:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.hub.download_url_to_file(url, path)
    return path


def check_sam_weights(model: str, weights: Optional[str]) -> None:
    """Fail in about a second, without building or downloading anything, wherever ``load_sam``
    would fail to get weights (a driver's check before it starts workers)."""
    sam_arch(model)
    if weights is not None and weights.lower() not in RANDOM_WEIGHTS:
        _checkpoint_path(model, weights, download=False)


def load_sam(model: str = "vit_b", weights: Optional[str] = "hub", arch: Optional[Mapping[str, Any]] = None,
             device: str | torch.device = "cpu") -> torch.nn.Module:
    """A SAM in eval mode on ``device``: weights ``hub``, a local checkpoint, or none/random. The
    weights are found (or found missing) before the model is built."""
    if weights is None or weights.lower() in RANDOM_WEIGHTS:
        log.warning("SAM %s has random weights: its masks are meaningless", model)
        return build_sam(model, arch).to(device)
    path = _checkpoint_path(model, weights)
    sam = build_sam(model, arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        sam.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, OSError, KeyError) as err:
        raise WeightsUnavailableError(f"could not load SAM {model} weights from {path}: "
                                      f"{str(err).splitlines()[0][:200]}") from err
    return sam.to(device)
