"""SAM refinement (``refine: sam``) as a worker stage: SAM is loaded once, on the model's device;
each image's small encoder input is made while it is decoded, the embeddings of a whole batch come
from one encoder call on the model thread, and the prompts and merge run per image with the
label maps (``gem.segmenter.GEMSegmenter.refined_label_map``).

Memory: the decoded image is not kept; only SAM's encoder input (longest side 1024, about 3 MB)
waits in the queues. Images over ``sam.max_pixels`` are refined at ``working_size`` (scaled
down) and their labels taken to the image's size band by band, so a 12 MP photo holds a few
4 MP score maps at most, never full-size ones.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from gem.loading import RANDOM_WEIGHTS
from gem.large_images import resized_rgb, working_size
from gem.sam_refine import SAMImage, SAMRefiner
from pipeline.config import LabelConfig

SAM_BATCH = 8  # images per SAM encoder call (SAM ViT-H's activations at 1024 are large)


def load_refiner(config: LabelConfig, device: torch.device) -> Optional[SAMRefiner]:
    """The run's SAM refiner on ``device``, or None without ``refine: sam``. Random weights
    (tests) are the same in every worker."""
    if config.refine != "sam":
        return None
    if config.sam.weights is None or config.sam.weights.lower() in RANDOM_WEIGHTS:
        torch.manual_seed(0)
    return SAMRefiner.from_settings(config.sam, device)


class RefineInputs:
    """The decode thread's half: the RGB image -> SAM's encoder input at the working size."""

    def __init__(self, refiner: SAMRefiner):
        self.refiner = refiner

    def __call__(self, image: Image.Image, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
        work = working_size(height, width, self.refiner.settings.max_pixels)  # of the image's own size
        return self.refiner.encoder_input(resized_rgb(np.asarray(image), work))  # a drafted JPEG: scaled up


def embed_batch(refiner: SAMRefiner, samples: list, autocast) -> None:
    """SAM's embeddings of a batch's images, ``SAM_BATCH`` per encoder call, each left on its
    sample (``refine_state``) in place of its encoder input."""
    todo = [sample for sample in samples if sample.refine_input is not None]
    if not todo:
        return
    with autocast():
        embeddings = refiner.embed_inputs([sample.refine_input for sample in todo], SAM_BATCH)
    for sample, embedding in zip(todo, embeddings):
        sample.refine_state, sample.refine_input = embedding, None


def sam_image_of(sample) -> SAMImage:
    if not isinstance(sample.refine_state, SAMImage):
        raise RuntimeError("refine: sam: the image has no SAM embedding (it was not decoded for refinement)")
    return sample.refine_state
