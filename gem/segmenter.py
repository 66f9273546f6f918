"""GEMSegmenter: an open_clip CLIP wrapped with GEM, from images and class names to regions."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from gem.loading import LoadedCLIP, load_clip
from gem.postprocess import ClassRegion, LabelingThresholds, label_image
from gem.preprocess import image_to_tensor
from gem.settings import GEMSettings
from gem.templates import TemplateSpec
from gem.vision import GEMTokens, GEMVisionTower
from gem.vocabulary import TextEmbeddingCache, Vocabulary


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' -> bf16 on GPU, fp32 on CPU; 'fp32' | 'bf16' | 'fp16' as named."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in choices:
        raise ValueError(f"precision must be one of auto, {', '.join(choices)}; got {precision!r}")
    return choices[precision]


class GEMSegmenter:
    def __init__(self, clip: LoadedCLIP, settings: GEMSettings = GEMSettings(),
                 device: Optional[str | torch.device] = None, precision: str = "auto", fast: bool = True):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = clip.model.to(self.device).eval()
        self.settings = settings
        self.tower = GEMVisionTower(self.model.visual, settings.depth, settings.iters,
                                    settings.inv_temperature, fast=fast)
        self.mean, self.std = clip.mean, clip.std
        self.dtype = autocast_dtype(precision, self.device)
        self.text = TextEmbeddingCache(self.model.encode_text, clip.tokenizer, self.device)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: Optional[str], settings: GEMSettings = GEMSettings(),
                        device: Optional[str | torch.device] = None, precision: str = "auto",
                        fast: bool = True) -> "GEMSegmenter":
        device = torch.device(device) if device is not None else default_device()
        return cls(load_clip(model_name, pretrained, device), settings, device, precision, fast)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.tower.patch_size

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def vocabulary(self, class_names: Sequence[str], templates: TemplateSpec = None) -> Vocabulary:
        """Text embeddings for the classes, computed once per (names, templates)."""
        with self._autocast():
            return self.text.get(class_names, templates)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, keep_original: bool = False) -> GEMTokens:
        with self._autocast():
            return self.tower(images.to(self.device), keep_original=keep_original)

    @torch.no_grad()
    def patch_similarities(self, images: torch.Tensor, vocabulary: Vocabulary,
                           use_original: bool = False) -> torch.Tensor:
        """Cosine similarity of every patch to every class: (B, C, grid_h, grid_w), float32."""
        tokens = self.tokens(images, keep_original=use_original)
        features = tokens.original if use_original else tokens.gem
        patches = F.normalize(features[:, 1:].float(), dim=-1)
        sims = patches @ vocabulary.embeddings.to(patches.device).T
        batch, (grid_h, grid_w) = sims.shape[0], tokens.grid
        return sims.transpose(1, 2).reshape(batch, -1, grid_h, grid_w)

    def heatmaps(self, images: torch.Tensor, vocabulary: Vocabulary, normalize: bool = False,
                 size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Similarities upsampled (bilinear) to ``size`` (height, width; e.g. the original image's,
        default the input's); min-max scaled per map if asked."""
        sims = self.patch_similarities(images, vocabulary)
        maps = F.interpolate(sims, size=tuple(size or images.shape[-2:]), mode="bilinear", align_corners=False)
        if normalize:
            flat = maps.flatten(2)
            low, high = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
            maps = ((flat - low) / (high - low)).view_as(maps)
        return maps

    def preprocess(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """PIL images -> one (B, 3, H, W) batch at ``size`` (height, width)."""
        return torch.stack([image_to_tensor(image, size, self.mean, self.std) for image in images])

    def label(self, images: Sequence[Image.Image], vocabulary: Vocabulary, input_size: tuple[int, int] = (448, 448),
              thresholds: LabelingThresholds = LabelingThresholds()) -> list[list[ClassRegion]]:
        """Label PIL images: per image, one region per present class at the image's own size."""
        sims = self.patch_similarities(self.preprocess(images, input_size), vocabulary)  # label maps on its device
        return [label_image(s, (image.height, image.width), thresholds)[1] for s, image in zip(sims, images)]
