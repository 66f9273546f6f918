"""GEMSegmenter: an open_clip CLIP wrapped with GEM (or a NACLIP-family head, or ProxyCLIP with its
VFM), from images and class names to regions.

Pipeline per batch: resize (square or short side, ``gem.windows``) -> the model, whole image or
sliding windows with the crops of all images batched (``dense_logits``) -> per image, in bands at
its own size: upsampling, optional PAMR, synonyms and background (``gem.dense``) -> regions
(``gem.postprocess.label_map``, then ``class_regions``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import numpy as np
import torch.nn.functional as F
from PIL import Image

from gem.dense import top_class_bands
from gem.heads import HEAD_METHODS, LastBlockTower
from gem.loading import LoadedCLIP, load_clip
from gem.pamr import PAMRSettings
from gem.postprocess import ClassRegion, ClassStats, LabelingThresholds, class_regions, label_map
from gem.preprocess import image_to_tensor
from gem.settings import GEMSettings
from gem.templates import TemplateSpec
from gem.vision import GEMTokens, GEMVisionTower
from gem.vocabulary import ClassEntry, TextEmbeddingCache, Vocabulary
from gem.windows import ResizeSettings, SlideWindows, grouped_similarities, slide_logits

if TYPE_CHECKING:
    from gem.sam_refine import RefinedLabels, SAMImage, SAMRefiner
    from gem.vfm import VFMFeatures

METHODS = ("gem",) + HEAD_METHODS + ("proxyclip",)


@dataclass(frozen=True)
class InferenceSettings:
    """How images go through the model and come back: resize, sliding windows (None: the whole
    image), PAMR (None: off), and at most ``max_batch`` images or crops per forward."""

    resize: ResizeSettings = ResizeSettings()
    slide: Optional[SlideWindows] = None
    pamr: Optional[PAMRSettings] = None
    max_batch: int = 32

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


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
    """vfm: ProxyCLIP's proxy model, already built (tests, benchmarks); None: loaded from
    ``settings.proxyclip.vfm`` when the method is proxyclip."""

    def __init__(self, clip: LoadedCLIP, settings: GEMSettings = GEMSettings(),
                 device: Optional[str | torch.device] = None, precision: str = "auto", fast: bool = True,
                 inference: InferenceSettings = InferenceSettings(), vfm: Optional["VFMFeatures"] = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = clip.model.to(self.device).eval()
        self.settings, self.inference = settings, inference
        self.pad_multiple = 1  # sliding-window crops padded to multiples of it (ProxyCLIP's 56)
        if settings.method == "gem":
            self.tower = GEMVisionTower(self.model.visual, settings.depth, settings.iters,
                                        settings.inv_temperature, fast=fast)
        elif settings.method == "proxyclip":
            from gem.proxyclip import ProxyCLIPTower
            from gem.vfm import load_vfm
            proxy = settings.proxyclip
            vfm = (vfm if vfm is not None else load_vfm(proxy.vfm, self.device)).to(self.device).eval()
            self.tower = ProxyCLIPTower(self.model.visual, vfm, clip.mean, clip.std, proxy.beta, proxy.gamma,
                                        proxy.fix_nonsquare)
            self.pad_multiple = proxy.pad_multiple
        else:
            self.tower = LastBlockTower(self.model.visual, settings.method, settings.gaussian_std)
        self.mean, self.std = clip.mean, clip.std
        self.dtype = autocast_dtype(precision, self.device)
        self.text = TextEmbeddingCache(self.model.encode_text, clip.tokenizer, self.device)

    @property
    def vfm(self) -> Optional["VFMFeatures"]:
        """ProxyCLIP's proxy model (None for the other methods)."""
        return getattr(self.tower, "vfm", None)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: Optional[str], settings: GEMSettings = GEMSettings(),
                        device: Optional[str | torch.device] = None, precision: str = "auto",
                        fast: bool = True, inference: InferenceSettings = InferenceSettings()) -> "GEMSegmenter":
        device = torch.device(device) if device is not None else default_device()
        return cls(load_clip(model_name, pretrained, device), settings, device, precision, fast, inference)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.tower.patch_size

    def autocast(self):
        """The model's autocast context (its precision), for models run alongside it (SAM)."""
        return self._autocast()

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def vocabulary(self, class_names: Sequence[ClassEntry], templates: TemplateSpec = None,
                   background: Sequence[str] = (), progress: Optional[Callable[[int, int], None]] = None
                   ) -> Vocabulary:
        """Text embeddings for the classes (a name or a list of synonyms each) and background
        names, computed once per (names, templates); ``progress(done, total)`` counts prompts."""
        with self._autocast():
            return self.text.get(class_names, templates, background, progress)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, keep_original: bool = False) -> GEMTokens:
        if keep_original and self.settings.method != "gem":
            raise ValueError("keep_original: only the gem method keeps the original path")
        with self._autocast():
            if self.settings.method != "gem":  # the heads and ProxyCLIP have no original path
                return self.tower(images.to(self.device))
            return self.tower(images.to(self.device), keep_original=keep_original)

    @torch.no_grad()
    def patch_similarities(self, images: torch.Tensor, vocabulary: Vocabulary,
                           use_original: bool = False) -> torch.Tensor:
        """Cosine similarity of every patch to every class: (B, C, grid_h, grid_w), float32."""
        tokens = self.tokens(images, keep_original=use_original)
        features = tokens.original if use_original else tokens.gem
        patches = F.normalize(features[:, tokens.prefix:].float(), dim=-1)
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

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input's (height, width) for an image of this size (``inference.resize``),
        never less than a patch in a side (windows then are never smaller either)."""
        return self.inference.resize.model_size(height, width, self.patch_size)

    def model_input(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> its normalised (3, h, w) model input at ``model_size``."""
        return image_to_tensor(image, self.model_size(image.height, image.width), self.mean, self.std)

    @torch.no_grad()
    def dense_logits(self, images: Sequence[torch.Tensor], vocabulary: Vocabulary) -> list[torch.Tensor]:
        """Model inputs of any sizes -> per image the cosine similarity of every vocabulary word:
        (words, grid_h, grid_w) for whole images, (words, h, w) with sliding windows. Images (or
        all their windows) share forwards, ``inference.max_batch`` at a time."""
        def similarities(batch: torch.Tensor) -> torch.Tensor:
            return self.patch_similarities(batch, vocabulary)
        images = [image.to(self.device) for image in images]
        if self.inference.slide is None:
            return grouped_similarities(similarities, images, self.inference.max_batch)
        return slide_logits(similarities, images, self.inference.slide, self.inference.max_batch, self.pad_multiple)

    def label_map(self, logits: torch.Tensor, size: tuple[int, int], vocabulary: Vocabulary,
                  thresholds: LabelingThresholds = LabelingThresholds(), image: Optional[torch.Tensor] = None
                  ) -> tuple[np.ndarray, ClassStats]:
        """One image's ``dense_logits`` -> (label map on the CPU, each class's statistics) at
        ``size`` (height, width), the image's own, computed on the logits' device. ``image``: its
        model input, needed for PAMR."""
        bands = top_class_bands(logits, size, vocabulary.word_class.to(logits.device), len(vocabulary),
                                thresholds.logit_scale, thresholds.background_threshold,
                                self.inference.pamr, None if image is None else image.to(logits.device))
        return label_map(None, size, thresholds, top_bands=bands, num_classes=len(vocabulary))

    def refined_label_map(self, logits: torch.Tensor, size: tuple[int, int], vocabulary: Vocabulary,
                          refiner: "SAMRefiner", image_rgb: np.ndarray,
                          thresholds: LabelingThresholds = LabelingThresholds(), sam_image: Optional["SAMImage"] = None
                          ) -> tuple[np.ndarray, ClassStats, "RefinedLabels"]:
        """``label_map`` after SAM refinement (``gem.sam_refine``): the coarse map and class scores
        at ``size`` (background names and unconfident pixels as one more class, as Trident's
        background), refined with ``image_rgb`` ((H, W, 3) uint8 at ``size``; embedded once unless
        ``sam_image`` is given, that of the image at ``working_size``); the statistics' peaks are
        the refined ones. PAMR is not applied. Over ``refiner.settings.max_pixels`` pixels the
        refinement runs at ``working_size`` and its map is taken to ``size`` (nearest), so memory
        stays bounded; ``RefinedLabels`` is then at the working size."""
        from gem.large_images import nearest_bands, resized_rgb, working_size
        from gem.sam_refine import coarse_maps, region_bands
        work = working_size(*size, refiner.settings.max_pixels)
        if sam_image is None:
            image_rgb = resized_rgb(image_rgb, work)
        labels, scores = coarse_maps(logits, work, vocabulary.word_class, len(vocabulary), thresholds.logit_scale,
                                     thresholds.background_threshold)
        result = refiner.refine(image_rgb, labels, scores, sam_image)
        bands = region_bands(result, scores, len(vocabulary))
        if work != tuple(size):
            bands = nearest_bands(bands, work, tuple(size))
        labels_np, stats = label_map(None, size, thresholds, top_bands=bands, num_classes=len(vocabulary))
        return labels_np, stats, result

    def regions(self, logits: torch.Tensor, size: tuple[int, int], vocabulary: Vocabulary,
                thresholds: LabelingThresholds = LabelingThresholds(), image: Optional[torch.Tensor] = None
                ) -> tuple[np.ndarray, list[ClassRegion]]:
        """``label_map``, then one region per present class (COCO RLE cut on the CPU)."""
        labels, stats = self.label_map(logits, size, vocabulary, thresholds, image)
        return labels, list(class_regions(labels, stats, thresholds.min_area))

    def label(self, images: Sequence[Image.Image], vocabulary: Vocabulary,
              input_size: Optional[tuple[int, int]] = None,
              thresholds: LabelingThresholds = LabelingThresholds()) -> list[list[ClassRegion]]:
        """Label PIL images: per image, one region per present class at the image's own size.
        ``input_size`` (height, width) overrides the resize with a square one."""
        if input_size is not None:
            inputs = [image_to_tensor(image, input_size, self.mean, self.std) for image in images]
        else:
            inputs = [self.model_input(image) for image in images]
        logits = self.dense_logits(inputs, vocabulary)
        return [self.regions(item, (image.height, image.width), vocabulary, thresholds, tensor)[1]
                for item, image, tensor in zip(logits, images, inputs)]
