"""SAM refinement (Trident) reproduces the reference's golden case (tests/data/sam-refine-reference,
see its README): half-resolution maps, components, prompts, mask prompts, SAM's outputs, the merge,
the failed-region step and the final map; then its invariants on another SAM and image size."""
import gzip
import hashlib
import io
import json
import dataclasses

import numpy as np
import pytest
import torch

from gem import WeightsUnavailableError
from gem.postprocess import BACKGROUND, LabelingThresholds, label_map
from gem.sam import build_sam, check_sam_weights, load_sam
from gem.sam_refine import Prompts, Regions, SAMImage, SAMRefiner, components, longest_side, region_bands
from gem.settings import SAMRefineSettings
from tests.models import SAM_REFERENCE as FIXTURE, sam_reference_arch

CASE = torch.load(io.BytesIO(gzip.decompress((FIXTURE / "cases.pt.gz").read_bytes())), weights_only=True)["cases"][0]
META = json.loads((FIXTURE / "meta.json").read_text())["cases"][0]
TOLERANCE = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=width).astype(bool))


def reference_settings(**changes) -> SAMRefineSettings:
    params = CASE["params"]
    return SAMRefineSettings(coarse_thresh=params["coarse_thresh"], minimal_area=params["minimal_area"],
                             mask_coeff=params["sam_mask_coff"], iou_thresh=params["sam_iou_thresh"], **changes)


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    model = build_sam("vit_b", sam_reference_arch())
    model.load_state_dict(torch.load(FIXTURE / "sam_state_dict.pt"))
    return model.eval()


@pytest.fixture(scope="module")
def sam_image() -> SAMImage:
    """The fixture's image embedding (``test_image_embedding_matches_reference`` checks ours)."""
    return SAMImage(CASE["sam_features"], tuple(CASE["sam_input_size"]), tuple(CASE["sam_original_size"]))


@pytest.fixture(scope="module")
def result(sam, sam_image):
    refiner = SAMRefiner(sam, reference_settings())
    return refiner.refine(CASE["image_rgb"].numpy(), CASE["seg_pred"].long(), CASE["seg_logits"], sam_image,
                          trace=True)


def test_image_embedding_matches_reference(sam):
    refiner = SAMRefiner(sam, reference_settings())
    image = CASE["image_rgb"].numpy()
    encoded = refiner.sam_image(image)
    assert list(encoded.shape[:2]) == CASE["sam_image_hw"]
    assert hashlib.sha256(np.ascontiguousarray(encoded).tobytes()).hexdigest() == CASE["sam_image_sha256"]
    embedded = refiner.embed(image)
    assert list(embedded.input_size) == CASE["sam_input_size"]
    assert list(embedded.original_size) == CASE["sam_original_size"]
    assert relative_error(embedded.features, CASE["sam_features"]) < TOLERANCE


def test_half_resolution_and_components_match_reference(result):
    regions: Regions = result.trace["regions"]
    half = CASE["half"]
    assert list(regions.half_labels.shape) == half["size"]
    assert torch.equal(regions.half_labels.to(torch.uint8), half["seg_pred_half"])
    assert torch.equal(regions.label_maps.short(), half["label_maps"])
    expected = [(c["cls"], c["label"], c["area_half"], c["kept"]) for c in CASE["components"]]
    assert regions.components == expected
    kept = [c for c in CASE["components"] if c["kept"]]
    assert [c["prompt_index"] for c in kept] == list(range(len(kept)))
    assert [c["passed"] for c in kept] == result.passed.tolist()


def test_prompts_match_reference(result):
    prompts, expected = result.prompts, CASE["prompts"]
    assert torch.equal(prompts.classes, expected["cls"])
    assert torch.equal(prompts.component_labels, expected["component_label"])
    assert torch.equal(prompts.points_half, expected["point_xy_half"])
    assert torch.equal(prompts.boxes_half, expected["box_xyxy_half"])
    assert relative_error(prompts.point_coords, expected["point_coords"]) < TOLERANCE
    assert relative_error(prompts.boxes, expected["boxes"]) < TOLERANCE
    assert bool((expected["point_labels"] == 1).all())
    masks = CASE["mask_prompts"]
    assert sorted(result.trace["mask_prompts"]) == masks["classes"]
    for index, cls in enumerate(masks["classes"]):
        assert result.trace["mask_prompts"][cls].shape == masks["masks"][index].shape  # unbatched (1, 256, 256)
        assert relative_error(result.trace["mask_prompts"][cls], masks["masks"][index]) < TOLERANCE
    assert list(longest_side(*CASE["seg_pred"].shape, 256)) == masks["resized_hw"]


def test_sam_outputs_match_reference(result):
    sam_out = CASE["sam"]
    assert relative_error(result.iou, sam_out["iou_pred"]) < TOLERANCE
    assert torch.equal(result.passed, sam_out["passed"])
    assert relative_error(result.trace["lowres_logits"], sam_out["lowres_logits"]) < TOLERANCE
    assert relative_error(result.scores_returned(), CASE["scores_returned"]) < TOLERANCE
    assert torch.equal(result.boxes_returned(), CASE["boxes_returned"])


def test_merge_and_final_map_match_reference(result):
    width = CASE["seg_pred"].shape[1]
    trace = result.trace
    passed_masks = torch.stack(trace["passed_masks"])
    assert torch.equal(passed_masks, unpack(CASE["passed_masks_packed"], width))
    assert torch.nonzero(~result.passed).flatten().tolist() == CASE["failed"]["prompt_index"]
    assert torch.equal(trace["failed_area"], unpack(CASE["failed"]["area_packed"], width))
    assert torch.equal(trace["failed_logit_won"], unpack(CASE["failed_logit_won_packed"], width))
    assert torch.equal(trace["labels_before_failed_merge"].to(torch.uint8), CASE["refined_masks_before_failed_merge"])
    assert torch.equal(result.labels.to(torch.uint8), CASE["refined_masks"])
    assert relative_error(result.scores, CASE["refined_logits"]) < TOLERANCE
    stats = META["stats"]
    assert int((result.labels != CASE["seg_pred"].long()).sum()) == stats["changed_pixels"]
    assert int(passed_masks.any(0).sum()) == stats["covered_pixels"]
    assert int(trace["failed_area"].sum()) == stats["failed_area_pixels"]


def test_no_pass_returns_the_coarse_map(sam, sam_image, result):
    refiner = SAMRefiner(sam, reference_settings())
    regions = result.trace["regions"]
    unchanged = refiner.merge(CASE["seg_pred"].long(), CASE["seg_logits"], regions, result.iou,
                              result.trace["lowres_logits"], sam_image, iou_thresh=CASE["no_pass"]["sam_iou_thresh"])
    assert torch.equal(unchanged.labels, CASE["seg_pred"].long())
    assert torch.equal(unchanged.scores, CASE["seg_logits"])
    assert not unchanged.passed.any() and unchanged.scores_returned().numel() == 0


def subset(regions: Regions, cls: int) -> Regions:
    keep = regions.prompts.classes == cls
    prompts = Prompts(*(getattr(regions.prompts, f.name)[keep] for f in dataclasses.fields(Prompts)))
    return dataclasses.replace(regions, prompts=prompts)


def test_quirks_and_their_fixes(sam, sam_image, result):
    quirks = META["quirks"]
    half = tuple(CASE["half"]["size"])
    reference = SAMRefiner(sam, reference_settings())
    assert list(reference._prompt_scale(half, sam_image)) == quirks["prompt_scale_used_yx"]
    fixed = SAMRefiner(sam, reference_settings(fix_prompt_frame=True, batch_mask_prompt=True))
    assert list(fixed._prompt_scale(half, sam_image)) == quirks["prompt_scale_sam_frame_yx"]
    # the batched mask prompt changes SAM's outputs by the README's amounts
    changed = quirks["batched_mask_prompt_would_change"]
    regions = subset(result.trace["regions"], changed["class_"])
    iou, lowres, _ = fixed.predict(regions, tuple(CASE["seg_pred"].shape), sam_image)
    index = result.prompts.classes == changed["class_"]
    assert abs((lowres - result.trace["lowres_logits"][index]).abs().max().item() - changed["max_abs_lowres"]) < 1e-4
    assert abs((iou - result.iou[index]).abs().max().item() - changed["max_abs_iou"]) < 1e-4


def test_component_numbering_is_raster_order():
    mask = np.zeros((6, 8), dtype=bool)
    mask[4:6, 0:2] = True   # first pixel in row 4
    mask[0, 6] = True       # row 0: first
    mask[1, 7] = True       # 8-connected to (0, 6)
    mask[2, 2:4] = True     # row 2
    labels, count = components(mask)
    assert count == 3
    assert labels[0, 6] == labels[1, 7] == 1 and labels[2, 2] == 2 and labels[4, 0] == 3


def test_missing_sam_weights_fail_with_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("gem.sam._reachable", lambda host, timeout=3.0: False)
    with pytest.raises(WeightsUnavailableError, match="pass its local path as the SAM weights"):
        load_sam("vit_h", "hub")
    with pytest.raises(WeightsUnavailableError, match="pass its local path as the SAM weights"):
        check_sam_weights("vit_b", "hub")
    check_sam_weights("vit_b", str(FIXTURE / "sam_state_dict.pt"))
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        load_sam("vit_b", str(tmp_path / "absent.pth"))


# ---- invariants on another SAM, image size and class count ----

@pytest.fixture(scope="module")
def small_case():
    """A random SAM with a 256 input (16 x 16 embedding, 64 x 64 mask prompts) and a 90 x 131
    image (odd, not a multiple of 16), three classes from smooth random scores plus a no-class
    patch (-1)."""
    torch.manual_seed(7)
    arch = dict(image_size=256, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                encoder_global_attn_indexes=[1], window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64,
                decoder_num_heads=4, iou_head_hidden_dim=32)
    sam = build_sam("vit_l", arch)
    sam.mask_decoder.iou_prediction_head.layers[-1].weight.data *= 20  # spread the random IoUs
    generator = torch.Generator().manual_seed(8)
    height, width = 90, 131
    fields = torch.nn.functional.interpolate(torch.randn(1, 3, 6, 8, generator=generator), size=(height, width),
                                             mode="bicubic", align_corners=False)[0]
    scores = torch.softmax(4 * fields, dim=0)
    labels = scores.argmax(0)
    labels[10:20, 100:120] = -1
    image = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return sam, image, labels, scores


def test_invariants_at_another_size(small_case):
    sam, image, labels, scores = small_case
    settings = SAMRefineSettings(coarse_thresh=0.0, minimal_area=20, iou_thresh=0.0)
    refiner = SAMRefiner(sam, settings)
    calls = {"encoder": 0, "decoder": []}
    hooks = [sam.image_encoder.register_forward_pre_hook(lambda m, a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             sam.mask_decoder.register_forward_hook(lambda m, a, k, out: calls["decoder"].append(out[0].shape[0]),
                                                    with_kwargs=True)]
    try:
        sam_image = refiner.embed(image)
        trial = refiner.refine(image, labels, scores, sam_image, trace=True)
        thresh = float(trial.iou.median())
        result = refiner.merge(labels, scores, trial.trace["regions"], trial.iou, trial.trace["lowres_logits"],
                               sam_image, iou_thresh=thresh, trace=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert sam_image.original_size == (96, 144) and sam_image.input_size == longest_side(96, 144, 256)
    prompts = result.prompts
    per_class = [int((prompts.classes == c).sum()) for c in prompts.classes.unique()]
    assert calls["encoder"] == 1 and calls["decoder"] == per_class  # one embedding, one batched call per class
    assert 0 < int(result.passed.sum()) < len(result.passed)
    covered = torch.stack(result.trace["passed_masks"]).any(0)
    failed = result.trace["failed_area"]
    # pixels no accepted mask covers keep their coarse label, rejected components included
    assert torch.equal(result.labels[~covered], labels[~covered])
    assert bool((failed & ~covered).any())
    # covered pixels take the best refined class; refined scores never exceed the coarse ones there
    before = result.trace["labels_before_failed_merge"]
    assert torch.equal(result.labels[covered], before[covered])
    outside = ~failed
    assert bool((result.scores[:, outside] <= scores[:, outside] + 1e-6).all())
    assert bool((result.scores[:, failed] >= scores[:, failed]).all())
    # the prompt frame: half-sized image (reference) vs SAM's input frame (fixed)
    half = (45, 65)
    assert refiner._prompt_scale(half, sam_image) != SAMRefiner(
        sam, settings.model_copy(update={"fix_prompt_frame": True}))._prompt_scale(half, sam_image)
    # everything above the threshold passes: nothing is left coarse inside the components
    nothing = refiner.merge(labels, scores, trial.trace["regions"], trial.iou, trial.trace["lowres_logits"],
                            sam_image, iou_thresh=float(trial.iou.max()))
    assert torch.equal(nothing.labels, labels) and torch.equal(nothing.scores, scores)


def test_batched_mask_prompt_and_fixed_frame_run(small_case):
    sam, image, labels, scores = small_case
    settings = SAMRefineSettings(coarse_thresh=0.0, minimal_area=20, iou_thresh=-10.0)
    reference = SAMRefiner(sam, settings)
    sam_image = reference.embed(image)
    fixed = SAMRefiner(sam, settings.model_copy(update={"batch_mask_prompt": True, "fix_prompt_frame": True}))
    a = reference.refine(image, labels, scores, sam_image, trace=True)
    b = fixed.refine(image, labels, scores, sam_image, trace=True)
    assert torch.equal(a.prompts.points_half, b.prompts.points_half)
    assert not torch.allclose(a.prompts.point_coords, b.prompts.point_coords)
    assert not torch.allclose(a.trace["lowres_logits"], b.trace["lowres_logits"])
    assert b.passed.all() and b.labels.shape == labels.shape


def test_region_points_are_the_refined_peaks(small_case):
    sam, image, labels, scores = small_case
    refiner = SAMRefiner(sam, SAMRefineSettings(coarse_thresh=0.0, minimal_area=20, iou_thresh=-10.0))
    result = refiner.refine(image, labels, scores)
    num_classes = scores.shape[0]
    labels_out, stats = label_map(None, tuple(labels.shape), LabelingThresholds(),
                                  top_bands=region_bands(result, scores, num_classes, rows=17),
                                  num_classes=num_classes)
    assert np.array_equal(labels_out, torch.where(result.labels < 0, BACKGROUND, result.labels).numpy())
    probability = torch.where(result.refined, result.scores.gather(0, result.labels.clamp(0)[None])[0],
                              scores.gather(0, result.labels.clamp(0)[None])[0])
    for cls in range(num_classes):
        inside = result.labels == cls
        if not inside.any():
            continue
        y, x = divmod(int(stats.peak_index[cls]), labels.shape[1])
        assert inside[y, x]
        assert stats.peak_prob[cls] == pytest.approx(float(probability[inside].max()), rel=1e-6)


def test_segmenter_labels_refined_end_to_end(small_case):
    """Any method's logits -> coarse maps (background names as one more class) -> SAM -> regions."""
    import open_clip
    from gem import GEMSegmenter, GEMSettings
    from gem.loading import LoadedCLIP
    from gem.postprocess import class_regions
    from gem.preprocess import OPENAI_MEAN, OPENAI_STD
    from gem.sam_refine import coarse_maps
    sam, image, _, _ = small_case
    torch.manual_seed(5)
    clip = LoadedCLIP(open_clip.create_model("gemtest-micro").eval(), open_clip.get_tokenizer("gemtest-micro"),
                      OPENAI_MEAN, OPENAI_STD)
    segmenter = GEMSegmenter(clip, GEMSettings(method="naclip"), device="cpu", precision="fp32")
    vocabulary = segmenter.vocabulary(["cat", ["dog", "puppy"]], background=["sky", "wall"])
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    (logits,) = segmenter.dense_logits([tensor], vocabulary)
    thresholds = LabelingThresholds(logit_scale=40.0, background_threshold=0.3)
    size = image.shape[:2]
    labels, scores = coarse_maps(logits, size, vocabulary.word_class, len(vocabulary), 40.0, 0.3)
    assert scores.shape == (3, *size) and set(labels.unique().tolist()) <= {0, 1, 2}
    refiner = SAMRefiner(sam, SAMRefineSettings(coarse_thresh=0.0, minimal_area=20, iou_thresh=-10.0))
    refined, stats, result = segmenter.refined_label_map(logits, size, vocabulary, refiner, image, thresholds)
    assert refined.shape == size and set(np.unique(refined).tolist()) <= {BACKGROUND, 0, 1}
    assert np.array_equal(refined, torch.where(result.labels == 2, BACKGROUND, result.labels).numpy())
    for region in class_regions(refined, stats):
        x, y = region.point
        assert region.mask[y, x] and refined[y, x] == region.class_id
