"""Create an open_clip CLIP from a model name and weights (tag, local file, or none).

Weights come from an open_clip pretrained tag (downloaded to the hub cache), a local
checkpoint path, or ``None`` for random weights (tests, benchmarks). Without network access a
tag that is not cached fails at once, with a message that says to pass a local path, instead
of hanging in download retries.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlparse

import torch

from gem.preprocess import OPENAI_MEAN, OPENAI_STD

from gem.torchvision_shim import import_torchvision

import_torchvision()
import open_clip  # noqa: E402  (needs the shim first)

from gem.vision import SUPPORTED_MODELS_HINT, UnsupportedModelError, check_supported  # noqa: E402

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = ("", "none", "random")


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be obtained (offline, unknown tag, missing file)."""


@dataclass
class LoadedCLIP:
    model: torch.nn.Module
    tokenizer: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _check_config(model_name: str) -> None:
    """Reject non-ViT towers from the config alone, before any weights are fetched."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    config = open_clip.get_model_config(model_name)
    if config is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-"))
        raise ValueError(f"unknown open_clip model {model_name!r}; ViT models open_clip knows: {known}")
    vision = config.get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)) \
            or vision.get("attentional_pool") or "hf_model_name" in vision:
        raise UnsupportedModelError(f"{SUPPORTED_MODELS_HINT}; {model_name!r} has another image tower.")


def _weights_host(model_name: str, tag: str) -> Optional[str]:
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urlparse(cfg.get("url", "")).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """Make huggingface_hub serve from its cache only (it reads this flag at call time)."""
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True


def load_clip(model_name: str, pretrained: Optional[str], device: str | torch.device = "cpu") -> LoadedCLIP:
    """Build the model in eval mode on ``device`` with the requested weights."""
    _check_config(model_name)
    schema_source = model_name.startswith(("hf-hub:", "local-dir:"))
    weights = None if schema_source or pretrained is None or pretrained.lower() in RANDOM_WEIGHTS else pretrained
    if weights is not None and not os.path.isfile(weights):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if weights not in tags:
            raise WeightsUnavailableError(
                f"--pretrained {weights!r} is neither a file nor an open_clip tag of {model_name} "
                f"(tags: {', '.join(tags) or 'none'}); pass a local checkpoint path")
    remote = model_name.startswith("hf-hub:") or (weights is not None and not os.path.isfile(weights))
    if remote:
        host = "huggingface.co" if schema_source else _weights_host(model_name, weights)
        if host and not _reachable(host):
            _go_offline()
    try:
        model = open_clip.create_model(model_name, pretrained=weights, device=device,
                                       load_weights=weights is not None or schema_source)
    except (RuntimeError, OSError, FileNotFoundError) as err:
        if not remote:
            raise WeightsUnavailableError(f"could not load weights from {weights}: {err}") from err
        raise WeightsUnavailableError(
            f"could not fetch weights for {model_name} ({weights or 'hub'}) - no network access or not cached "
            f"({str(err).splitlines()[0][:200]}). Download the checkpoint elsewhere and pass its local path, "
            f"e.g. --pretrained /path/to/open_clip_pytorch_model.bin") from err
    if weights is None and not schema_source:
        log.warning("model %s has random weights (pretrained=%r): outputs are meaningless", model_name, pretrained)
    check_supported(model.visual)
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", OPENAI_MEAN))
    std = tuple(cfg.get("std", OPENAI_STD))
    return LoadedCLIP(model, open_clip.get_tokenizer(model_name), mean, std)
