"""Trident's SAM refinement (Shi et al., arXiv 2411.09219): a coarse label map's regions prompt SAM.

A post-processing stage for any method, from a label map and its class score maps at the image's
size to refined ones, as the Trident reference does it:

1. Half resolution (floor): labels by ``nearest``, scores bilinearly. Pixels whose best score is
   below ``coarse_thresh`` there leave every class.
2. Per class (unless its best half-resolution score is below ``coarse_thresh``): 8-connected
   components of its mask, numbered in raster order of their first pixel; those of at least
   ``minimal_area`` half-resolution pixels become prompts: their box (inclusive max) and the first
   row-major position of their highest score.
3. One SAM call per class with prompts, all its prompts batched: one positive point and the box
   each, in SAM's 1024 frame, and the class's scores as the mask prompt (resized to the image's
   longest-side-256 size, zero-padded to 256 x 256, values above ``coarse_thresh`` times
   ``mask_coeff``, the rest 0); single-mask output. SAM encodes the image once.
4. Prompts whose predicted IoU is not above ``iou_thresh`` fail. None passing: nothing changes.
5. Passed masks, upscaled as SAM does (then to the image's size if SAM's differs), replace the
   coarse labels where they cover: per class the union of its masks, scored by the max over its
   passed prompts of sigmoid(logit) x the class's score (0 outside the union); label = argmax
   (ties: the lower class). Pixels no passed mask covers keep their coarse label.
6. Inside the failed prompts' components (``nearest``-upsampled), every class's refined score is
   raised to at least its coarse score; labels do not change.

Reference quirks kept by default (``gem.settings.SAMRefineSettings`` has the two plain defects'
fixes): prompts are scaled as if the image were its half-resolution size (``fix_prompt_frame``:
SAM's own frame instead), and the mask prompt goes in unbatched, shape (1, 256, 256), so SAM's
``LayerNorm2d`` normalises its rows (``batch_mask_prompt``: (N, 1, 256, 256)). Also as the
reference: SAM encodes the image with its sides rounded up to multiples of 16 (``image_multiple``),
areas and prompts are counted in half-resolution pixels, and refined scores are 0 where no passed
mask or failed region lies (``RefinedLabels.refined`` says where they mean something).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gem.postprocess import BACKGROUND
from gem.settings import SAMRefineSettings

Tensor = torch.Tensor


def longest_side(height: int, width: int, length: int) -> tuple[int, int]:
    """(height, width) scaled so the longest side is ``length``, rounded half up (SAM's
    ``ResizeLongestSide.get_preprocess_shape``)."""
    scale = length * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (h, w) mask: int32 labels 1..n numbered in raster order of
    each component's first pixel (scikit-image's order), 0 outside; and n."""
    import cv2
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if count <= 2:
        return labels, count - 1
    values, first = np.unique(labels.ravel(), return_index=True)  # first raster position of each label
    order = values[1:][np.argsort(first[1:], kind="stable")]
    renumber = np.zeros(count, dtype=np.int32)
    renumber[order] = np.arange(1, count, dtype=np.int32)
    return renumber[labels], count - 1


@dataclass
class SAMImage:
    """One image as SAM saw it: its embedding (1, D, 64, 64), the encoder's input size (the
    resized image before padding) and the size of the image it encoded."""

    features: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class Prompts:
    """An image's prompts, class ascending then component label: class, component label, peak
    (x, y) and box (x1, y1, x2, y2, inclusive) in half-resolution pixels, and the same in SAM's
    1024 frame as SAM gets them."""

    classes: Tensor
    component_labels: Tensor
    points_half: Tensor
    boxes_half: Tensor
    point_coords: Tensor
    boxes: Tensor


@dataclass
class Regions:
    """Steps 1-2 of one image: half-resolution labels (C where no class) and scores, each class's
    component labels (C, h, w) (0: not the class), every component as (class, label, area,
    kept), and the kept ones' prompts."""

    half_labels: Tensor
    half_scores: Tensor
    label_maps: Tensor
    components: list[tuple[int, int, int, bool]]
    prompts: Prompts


@dataclass
class RefinedLabels:
    """labels (H, W) int64 and scores (C, H, W) float32 after refinement; refined: (H, W) bool,
    where a passed mask or a failed region lies (elsewhere the coarse label stays and the refined
    scores are the reference's 0s); iou / passed: per prompt (``prompts``' order). ``trace`` holds
    every intermediate when asked for."""

    labels: Tensor
    scores: Tensor
    refined: Tensor
    prompts: Prompts
    iou: Tensor
    passed: Tensor
    trace: dict = field(default_factory=dict)

    def scores_returned(self) -> Tensor:
        """(P, 1): the passed prompts' predicted IoUs (what the reference returns with the map)."""
        return self.iou[self.passed][:, None]

    def boxes_returned(self) -> Tensor:
        """(P, 4): the passed prompts' half-resolution boxes x 2."""
        return self.prompts.boxes_half[self.passed] * 2


class SAMRefiner:
    """Refines label maps with a segment-anything ``Sam`` (``gem.sam.load_sam``)."""

    MERGE_ELEMENTS = 1 << 24  # pixels x prompts of upscaled SAM logits held at once in ``merge``

    def __init__(self, sam: nn.Module, settings: SAMRefineSettings = SAMRefineSettings()):
        self.sam, self.settings = sam.eval(), settings

    @classmethod
    def from_settings(cls, settings: SAMRefineSettings, device: str | torch.device = "cpu") -> "SAMRefiner":
        from gem.sam import load_sam
        return cls(load_sam(settings.model, settings.weights, settings.arch, device), settings)

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def sam_image(self, image: np.ndarray) -> np.ndarray:
        """The (h, w, 3) uint8 RGB image SAM encodes: sides rounded up to ``image_multiple``,
        bilinearly resized (OpenCV) when that changes them, as Trident feeds SAM."""
        height, width = image.shape[:2]
        size = (round_up(height, self.settings.image_multiple), round_up(width, self.settings.image_multiple))
        if size == (height, width):
            return image
        import cv2
        return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def encoder_input(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The CPU half of ``embed``: (the uint8 pixels SAM's encoder gets before its padding: the
        ``sam_image`` resized to longest side 1024 by SAM's own transform, the ``sam_image``'s
        size). A worker computes it while decoding, so only this small image travels."""
        from gem.torchvision_shim import import_torchvision
        import_torchvision()
        from segment_anything.utils.transforms import ResizeLongestSide
        encoded = self.sam_image(image)
        return ResizeLongestSide(self.sam.image_encoder.img_size).apply_image(encoded), tuple(encoded.shape[:2])

    @torch.no_grad()
    def embed_inputs(self, inputs: list[tuple[np.ndarray, tuple[int, int]]], max_batch: int = 8) -> list[SAMImage]:
        """SAM's embeddings of many images' ``encoder_input``, ``max_batch`` per encoder call
        (SAM pads each to its square input, so any sizes batch); float32 embeddings."""
        out: list[SAMImage] = []
        for first in range(0, len(inputs), max_batch):
            chunk = inputs[first:first + max_batch]
            pixels = [torch.as_tensor(p, device=self.device).permute(2, 0, 1).contiguous()[None] for p, _ in chunk]
            batch = torch.cat([self.sam.preprocess(p.float()) for p in pixels])
            features = self.sam.image_encoder(batch).float()
            out += [SAMImage(features[i:i + 1], tuple(p.shape[-2:]), size)
                    for i, (p, (_, size)) in enumerate(zip(pixels, chunk))]
        return out

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> SAMImage:
        """SAM's image embedding of an (H, W, 3) uint8 RGB image (``sam_image`` of it): SAM's own
        resize (longest side 1024), normalisation, padding and encoder."""
        return self.embed_inputs([self.encoder_input(image)])[0]

    def _mask_prompt(self, half_scores: Tensor, size: tuple[int, int]) -> Tensor:
        """(1, 256, 256): a class's half-resolution scores at the longest-side-256 size of the
        image, zero-padded right and bottom, kept above coarse_thresh and scaled."""
        side = self.sam.prompt_encoder.mask_input_size[0]
        resized = F.interpolate(half_scores[None, None], size=longest_side(*size, side), mode="bilinear",
                                align_corners=False)
        padded = F.pad(resized, (0, side - resized.shape[-1], 0, side - resized.shape[-2]))[0]
        s = self.settings
        return torch.where(padded > s.coarse_thresh, padded * s.mask_coeff, torch.zeros_like(padded))

    def _prompt_scale(self, half: tuple[int, int], sam_image: SAMImage) -> tuple[float, float]:
        """(y, x) factors from half-resolution pixels to SAM's input frame: the reference's (as if
        the image were half-sized) or, with ``fix_prompt_frame``, SAM's own."""
        target = sam_image.input_size if self.settings.fix_prompt_frame else \
            longest_side(*half, self.sam.image_encoder.img_size)
        return target[0] / half[0], target[1] / half[1]

    @torch.no_grad()
    def regions(self, labels: Tensor, scores: Tensor, sam_image: SAMImage) -> Regions:
        """Steps 1-2: half resolution, each class's components, the kept ones' prompts."""
        s = self.settings
        device = scores.device
        num_classes, (height, width) = scores.shape[0], tuple(scores.shape[-2:])
        half = (height // 2, width // 2)
        half_labels = F.interpolate(labels[None, None].float(), size=half, mode="nearest")[0, 0].long()
        half_scores = F.interpolate(scores[None], size=half, mode="bilinear", align_corners=False)[0]
        if s.coarse_thresh > 0:
            half_labels[half_scores.max(dim=0).values < s.coarse_thresh] = num_classes
        label_maps = np.zeros((num_classes, *half), dtype=np.int32)
        found, kept = [], []
        labels_np = half_labels.cpu().numpy()
        best = half_scores.flatten(1).max(dim=1).values.tolist()
        for cls in range(num_classes):
            if best[cls] < s.coarse_thresh or not (labels_np == cls).any():
                continue
            label_maps[cls], count = components(labels_np == cls)
            areas = np.bincount(label_maps[cls].ravel(), minlength=count + 1)
            for label in range(1, count + 1):
                found.append((cls, label, int(areas[label]), bool(areas[label] >= s.minimal_area)))
                if areas[label] >= s.minimal_area:
                    kept.append((cls, label))
        maps = torch.from_numpy(label_maps).to(device)
        points, boxes = [], []
        for cls, label in kept:
            inside = maps[cls] == label
            ys, xs = torch.nonzero(inside, as_tuple=True)
            boxes.append(torch.stack((xs.min(), ys.min(), xs.max(), ys.max())).float())
            peak = int((half_scores[cls] * inside).flatten().argmax())  # outside the component: 0
            points.append(torch.tensor((peak % half[1], peak // half[1]), device=device))
        points_half = torch.stack(points) if points else torch.zeros((0, 2), dtype=torch.long, device=device)
        boxes_half = torch.stack(boxes) if boxes else torch.zeros((0, 4), device=device)
        scale_y, scale_x = self._prompt_scale(half, sam_image)
        # float32 coordinates times double factors, as SAM's ResizeLongestSide.apply_coords_torch
        point_coords = torch.stack((points_half[:, 0].float() * scale_x, points_half[:, 1].float() * scale_y),
                                   dim=-1)[:, None, :]
        sam_boxes = torch.stack((boxes_half[:, 0] * scale_x, boxes_half[:, 1] * scale_y,
                                 boxes_half[:, 2] * scale_x, boxes_half[:, 3] * scale_y), dim=-1)
        prompts = Prompts(torch.tensor([cls for cls, _ in kept], dtype=torch.long, device=device),
                          torch.tensor([label for _, label in kept], dtype=torch.long, device=device),
                          points_half, boxes_half, point_coords, sam_boxes)
        return Regions(half_labels, half_scores, maps, found, prompts)

    @torch.no_grad()
    def predict(self, regions: Regions, size: tuple[int, int], sam_image: SAMImage
                ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Step 3: SAM on every prompt, one call per class: (predicted IoU (N,), low-resolution
        logits (N, 256, 256), each class's mask prompt)."""
        prompts, device = regions.prompts, regions.half_scores.device
        count = len(prompts.classes)
        iou = torch.zeros(count, device=device)
        lowres = torch.zeros((count, *self.sam.prompt_encoder.mask_input_size), device=device)
        mask_prompts = {}
        for cls in prompts.classes.unique().tolist():
            index = torch.nonzero(prompts.classes == cls, as_tuple=True)[0]
            mask = mask_prompts[cls] = self._mask_prompt(regions.half_scores[cls], size)
            if self.settings.batch_mask_prompt:
                mask = mask[None].expand(len(index), -1, -1, -1)
            sparse, dense = self.sam.prompt_encoder(
                points=(prompts.point_coords[index], torch.ones((len(index), 1), device=device)),
                boxes=prompts.boxes[index], masks=mask)
            low, quality = self.sam.mask_decoder(
                image_embeddings=sam_image.features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
            lowres[index], iou[index] = low[:, 0], quality[:, 0]
        return iou, lowres, mask_prompts

    @torch.no_grad()
    def merge(self, labels: Tensor, scores: Tensor, regions: Regions, iou: Tensor, lowres: Tensor,
              sam_image: SAMImage, iou_thresh: Optional[float] = None, trace: bool = False) -> RefinedLabels:
        """Steps 4-6: SAM's accepted masks over the coarse map (``iou_thresh``: the settings' if
        None), failed regions' scores raised to the coarse ones."""
        thresh = self.settings.iou_thresh if iou_thresh is None else iou_thresh
        prompts, device = regions.prompts, scores.device
        height, width = scores.shape[-2:]
        passed = iou > thresh
        log: dict = {}
        if not bool(passed.any()):
            return RefinedLabels(labels, scores, torch.zeros_like(labels, dtype=torch.bool), prompts, iou, passed)
        refined = torch.zeros_like(scores)
        covered = torch.zeros((height, width), dtype=torch.bool, device=device)
        passed_masks = {}
        chunk = max(1, self.MERGE_ELEMENTS // (height * width))  # prompts upscaled at once: bounded memory
        for cls in prompts.classes[passed].unique().tolist():
            index = torch.nonzero((prompts.classes == cls) & passed, as_tuple=True)[0]
            union, best_prob = None, None
            for part in index.split(chunk):  # union and max over the class's masks, a few at a time
                logits = self.sam.postprocess_masks(lowres[part, None], sam_image.input_size,
                                                    sam_image.original_size)
                if tuple(logits.shape[-2:]) != (height, width):
                    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                masks = logits[:, 0] > self.sam.mask_threshold
                part_union = masks.any(dim=0)
                part_best = (torch.sigmoid(logits[:, 0]) * scores[cls]).max(dim=0).values
                union = part_union if union is None else union | part_union
                best_prob = part_best if best_prob is None else torch.maximum(best_prob, part_best)
                if trace:
                    passed_masks.update(zip(part.tolist(), masks))
                del logits, masks
            refined[cls] = torch.where(union, best_prob, torch.zeros_like(best_prob))
            covered |= union
        best_class = refined.argmax(dim=0)
        out_labels = torch.where(covered, best_class, labels)
        failed_half = torch.zeros(regions.label_maps.shape[1:], dtype=torch.bool, device=device)
        for cls, label, ok in zip(prompts.classes.tolist(), prompts.component_labels.tolist(), passed.tolist()):
            if not ok:
                failed_half |= regions.label_maps[cls] == label
        failed = F.interpolate(failed_half[None, None].float(), size=(height, width), mode="nearest")[0, 0].bool()
        raised = torch.where(failed, torch.maximum(refined, scores), refined)
        if trace:
            log.update(passed_masks=[passed_masks[i] for i in sorted(passed_masks)], failed_area=failed,
                       failed_logit_won=failed & (scores > refined), labels_before_failed_merge=best_class)
        return RefinedLabels(out_labels, raised, covered | failed, prompts, iou, passed, log)

    @torch.no_grad()
    def refine(self, image: Optional[np.ndarray], labels: Tensor, scores: Tensor,
               sam_image: Optional[SAMImage] = None, trace: bool = False) -> RefinedLabels:
        """Refine one image's coarse (H, W) label map (class ids 0..C-1; any other value belongs
        to no class and stays unless a passed mask covers it) with its (C, H, W) class scores (the
        probabilities the labels were taken from). ``image``: (H, W, 3) uint8 RGB, embedded once
        unless ``sam_image`` gives its embedding already. ``trace``: keep every intermediate
        (``RefinedLabels.trace``)."""
        labels, scores = labels.to(self.device).long(), scores.to(self.device).float()
        if sam_image is None:
            sam_image = self.embed(image)
        regions = self.regions(labels, scores, sam_image)
        iou, lowres, mask_prompts = self.predict(regions, tuple(scores.shape[-2:]), sam_image)
        result = self.merge(labels, scores, regions, iou, lowres, sam_image, trace=trace)
        if trace:
            result.trace.update(regions=regions, mask_prompts=mask_prompts, lowres_logits=lowres)
        return result


def coarse_maps(logits: Tensor, size: tuple[int, int], word_class: Tensor, num_classes: int,
                logit_scale: float, threshold: float) -> tuple[Tensor, Tensor]:
    """A method's dense word logits -> the coarse (label map, class scores) refinement starts from,
    at the image's ``size``: scores (groups, H, W) are ``gem.dense.class_probabilities`` of the
    bilinearly upsampled logits (the background names' group last, when there are any), labels
    their argmax, unconfident pixels (best score below ``threshold``) going to the background
    group as Trident sends them to its background class, or to -1 (no class) without one."""
    from gem.dense import class_probabilities
    groups = num_classes + int(bool((word_class >= num_classes).any()))
    upsampled = F.interpolate(logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    scores = class_probabilities(upsampled, word_class.to(logits.device), groups, logit_scale)
    top, labels = scores.max(dim=0)
    unconfident = num_classes if groups > num_classes else BACKGROUND
    return torch.where(top < threshold, torch.full_like(labels, unconfident), labels), scores


def region_bands(result: RefinedLabels, coarse_scores: Tensor, num_classes: int,
                 rows: int = 256) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first row, probability, class or BACKGROUND) bands of a refined map, for
    ``gem.postprocess.label_map(top_bands=...)``: its points become the refined peaks. A pixel's
    probability is its label's refined score where refinement reached it, its coarse score
    elsewhere (the reference's 0 there would drag the region's mean down); labels outside
    [0, num_classes) (background names, unconfident pixels) are BACKGROUND."""
    labels = result.labels
    height = labels.shape[0]
    for start in range(0, height, rows):
        band = labels[start:start + rows]
        index = band.clamp(0, result.scores.shape[0] - 1)[None]
        refined = result.scores[:, start:start + rows].gather(0, index)[0]
        coarse = coarse_scores[:, start:start + rows].to(refined.device).gather(0, index)[0]
        prob = torch.where(result.refined[start:start + rows], refined, coarse)
        cls = torch.where((band >= 0) & (band < num_classes), band, torch.full_like(band, BACKGROUND))
        yield start, prob, cls

