"""Resize, sliding windows (placement, batching across images), synonyms/background decisions,
and points from the PAMR-refined map, on the tiny reference model."""
import math

import numpy as np
import pytest
import torch

from gem import (GEMSegmenter, GEMSettings, InferenceSettings, LabelingThresholds, PAMRSettings, ResizeSettings,
                 SlideWindows, load_clip)
from gem.dense import class_probabilities, decide
from gem.pamr import refine
from gem.windows import window_boxes
from tests.models import reference_state_dict
from tests.shards import photo


@pytest.fixture(scope="module")
def clip():
    clip = load_clip("gemref-tiny", None, "cpu")
    clip.model.load_state_dict(reference_state_dict())
    return clip


@pytest.mark.parametrize("height, width, crop, stride", [
    (272, 368, 224, 112), (224, 224, 224, 112), (100, 500, 224, 112), (448, 597, 448, 224), (300, 301, 64, 64)])
def test_windows_follow_mmseg_placement(height, width, crop, stride):
    boxes = window_boxes(height, width, crop, stride)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    assert len(boxes) == rows * cols
    covered = np.zeros((height, width), dtype=int)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == (min(crop, height), min(crop, width))  # clamped, never cut short
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert boxes[0][0] == 0 and boxes[0][2] == 0 and boxes[-1][1] == height and boxes[-1][3] == width
    if rows > 1:  # all but the last row of windows start at multiples of the stride
        assert [box[0] for box in boxes[::cols]][:-1] == [r * stride for r in range(rows - 1)]


def test_window_boxes_of_the_reference_case():
    assert window_boxes(272, 368, 224, 112) == [
        (0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 144, 368),
        (48, 272, 0, 224), (48, 272, 112, 336), (48, 272, 144, 368)]


def test_short_side_resize_keeps_aspect_and_caps_the_long_side():
    resize = ResizeSettings("short_side", short_side=336, max_long_side=2048)
    assert resize.model_size(375, 500) == (336, 448)
    assert resize.model_size(500, 375) == (448, 336)
    assert resize.model_size(100, 5000) == (41, 2048)
    assert ResizeSettings().model_size(375, 500) == (448, 448)
    with pytest.raises(ValueError, match="resize must be one of"):
        ResizeSettings("long_side")


def test_crops_of_many_images_share_forwards(clip):
    settings = InferenceSettings(slide=SlideWindows(64, 32), max_batch=8)
    segmenter = GEMSegmenter(clip, GEMSettings(method="naclip"), device="cpu", precision="fp32", inference=settings)
    vocab = segmenter.vocabulary(["cat", ["dog", "puppy"]])
    torch.manual_seed(0)
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 100), torch.randn(3, 130, 64)]
    batches = []
    forward = segmenter.patch_similarities
    segmenter.patch_similarities = lambda batch, vocabulary: batches.append(batch.shape[0]) or forward(batch, vocabulary)
    together = segmenter.dense_logits(images, vocab)
    crops = sum(len(window_boxes(*image.shape[-2:], 64, 32)) for image in images)
    assert sum(batches) == crops == 6 + 3 + 4
    assert len(batches) == math.ceil(crops / 8) and max(batches) == 8  # one forward holds several images' crops
    batches.clear()
    alone = [segmenter.dense_logits([image], vocab)[0] for image in images]
    assert len(batches) == 3
    for a, b, image in zip(together, alone, images):
        assert a.shape == (3, *image.shape[-2:])  # one map per word
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_synonyms_take_the_max_and_background_names_are_never_labels():
    logits = torch.tensor([[0.30, 0.10, 0.00],    # person
                           [0.10, 0.35, 0.00],    # man (person's synonym)
                           [0.20, 0.20, 0.10],    # dog
                           [0.00, 0.00, 0.40]])   # sky (background)
    word_class = torch.tensor([0, 0, 1, 2])
    probs = class_probabilities(logits, word_class, 3, 40.0)
    words = torch.softmax(logits * 40.0, dim=0)
    torch.testing.assert_close(probs[0], torch.maximum(words[0], words[1]))
    top_prob, top_class = decide(probs, num_classes=2, threshold=0.0)
    assert top_class.tolist() == [0, 0, -1]
    torch.testing.assert_close(top_prob, probs.max(0).values / probs.sum(0))
    threshold = float(probs[:, :2].max(0).values.mean())  # between the two class pixels' top probabilities
    _, thresholded = decide(probs, num_classes=2, threshold=threshold)
    assert thresholded.tolist() == [0 if probs[0, i] >= threshold else -1 for i in range(2)] + [-1]
    assert thresholded[:2].tolist().count(-1) == 1


def test_points_and_scores_come_from_the_refined_map(clip):
    pamr = PAMRSettings(steps=5, dilations=(1, 2))
    inference = InferenceSettings(ResizeSettings("short_side", short_side=96), SlideWindows(64, 32), pamr)
    segmenter = GEMSegmenter(clip, GEMSettings(method="naclip"), device="cpu", precision="fp32", inference=inference)
    vocab = segmenter.vocabulary(["person", "dog", ["sofa", "couch"]], background=["wall"])
    image = photo(0)
    inputs = segmenter.model_input(image)
    (logits,) = segmenter.dense_logits([inputs], vocab)
    size = (image.height, image.width)
    thresholds = LabelingThresholds(logit_scale=40.0)
    labels, regions = segmenter.regions(logits, size, vocab, thresholds, inputs)

    upsampled = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    image_up = torch.nn.functional.interpolate(inputs[None], size=size, mode="bilinear", align_corners=False)[0]
    refined = refine(image_up, upsampled, pamr)
    top_prob, top_class = decide(class_probabilities(refined, vocab.word_class, len(vocab) + 1, 40.0), len(vocab), 0.0)
    assert (torch.from_numpy(labels).long() != top_class).float().mean() < 1e-3
    unrefined_prob, _ = decide(class_probabilities(upsampled, vocab.word_class, len(vocab) + 1, 40.0), len(vocab), 0.0)
    assert (unrefined_prob - top_prob).abs().max() > 1e-2  # PAMR moved the probabilities: the check can fail
    assert regions
    for region in regions:
        x, y = region.point
        assert labels[y, x] == region.class_id
        assert region.peak_score == pytest.approx(float(top_prob[y, x]), abs=1e-5)
        assert region.peak_score == pytest.approx(float(top_prob[torch.from_numpy(labels == region.class_id)].max()),
                                                  abs=1e-5)
