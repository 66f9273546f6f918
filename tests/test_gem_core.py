"""GEM library behaviour beyond the reference: shapes, batches, vocabulary cache, post-processing, loading."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import open_clip
from gem import GEMSegmenter, GEMSettings, LabelingThresholds, UnsupportedModelError, WeightsUnavailableError
from gem.loading import load_clip
from gem.postprocess import BACKGROUND, label_image, upsampled_bands
from gem.self_self_attention import self_self_attention, self_self_attention_naive
from gem.templates import resolve_templates
from tests.models import DATA, reference_state_dict


@pytest.fixture(scope="module")
def segmenter() -> GEMSegmenter:
    clip = load_clip("gemref-tiny", None, "cpu")
    clip.model.load_state_dict(reference_state_dict())
    return GEMSegmenter(clip, GEMSettings(), device="cpu", precision="fp32")


def test_fast_self_self_attention_matches_naive_with_per_image_temperature():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 50, 16).unbind(0)
    inv_temp = torch.tensor([0.7, 3.0]).view(2, 1, 1, 1)
    for iters in (0, 1, 3):
        fast = self_self_attention(q, k, v, inv_temp, iters)
        naive = self_self_attention_naive(q, k, v, inv_temp, iters)
        torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_any_size_and_batch_equals_single_images(segmenter):
    vocab = segmenter.vocabulary(["cat", "dog"])
    torch.manual_seed(1)
    images = torch.randn(3, 3, 96, 320)  # 6 x 20 patches, aspect 1:3.3
    batched = segmenter.patch_similarities(images, vocab)
    assert batched.shape == (3, 2, 6, 20)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], segmenter.patch_similarities(images[i:i + 1], vocab),
                                   rtol=1e-4, atol=1e-5)
    assert segmenter.heatmaps(images[:1], vocab).shape == (1, 2, 96, 320)
    original = segmenter.heatmaps(images[:1], vocab, size=(301, 997))  # e.g. the photo before resizing
    assert original.shape == (1, 2, 301, 997)
    torch.testing.assert_close(original, F.interpolate(batched[:1], size=(301, 997), mode="bilinear"))


def test_vocabulary_is_encoded_once_and_templates_are_averaged(segmenter):
    before = segmenter.text.encoded_prompts
    names = ["zebra", "giraffe", "okapi"]
    vocab = segmenter.vocabulary(names, "imagenet80")
    assert segmenter.text.encoded_prompts - before == 3 * 80
    again = segmenter.vocabulary(names, "imagenet80")
    assert again is vocab and segmenter.text.encoded_prompts - before == 3 * 80
    for _ in range(3):
        segmenter.patch_similarities(torch.randn(1, 3, 64, 64), vocab)
    assert segmenter.text.encoded_prompts - before == 3 * 80  # never per image
    single = [segmenter.vocabulary([name], [template]).embeddings[0] for template in vocab.templates[:80]
              for name in ["okapi"]]
    expected = F.normalize(torch.stack(single).mean(0), dim=-1)
    torch.testing.assert_close(vocab.embeddings[2], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vocab.embeddings.norm(dim=-1), torch.ones(3))


def test_templates_resolve_and_reject_bad_input(tmp_path):
    assert len(resolve_templates("imagenet80")) == 80
    assert resolve_templates(None) == ("a photo of a {}.",)
    assert resolve_templates("a sketch of {}") == ("a sketch of {}",)
    file = tmp_path / "t.txt"
    file.write_text("# mine\na {} in the wild\n\nthe {}\n")
    assert resolve_templates(str(file)) == ("a {} in the wild", "the {}")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["no slot"])
    with pytest.raises(ValueError, match="neither"):
        resolve_templates("no-such-set")


def test_vocabulary_rejects_empty_and_duplicate_names(segmenter):
    with pytest.raises(ValueError, match="empty"):
        segmenter.vocabulary([])
    with pytest.raises(ValueError, match="repeats"):
        segmenter.vocabulary(["cat", "cat "])


def test_banded_upsampling_equals_full_interpolation():
    torch.manual_seed(2)
    x = torch.randn(5, 7, 11)
    full = F.interpolate(x[None], size=(53, 90), mode="bilinear", align_corners=False)[0]
    bands = list(upsampled_bands(x, (53, 90), max_elements=5 * 90 * 4))
    assert len(bands) > 3
    torch.testing.assert_close(torch.cat([band for _, band in bands], dim=1), full, rtol=1e-5, atol=1e-5)


def test_label_image_regions_are_consistent():
    torch.manual_seed(3)
    sims = torch.randn(4, 6, 8) * 0.1
    labels, regions = label_image(sims, (61, 83), LabelingThresholds(logit_scale=100.0))
    full = torch.softmax(100.0 * F.interpolate(sims[None], size=(61, 83), mode="bilinear")[0], dim=0)
    np.testing.assert_array_equal(labels, full.argmax(0).numpy())
    assert sum(r.area for r in regions) == 61 * 83
    for region in regions:
        assert region.mask.shape == (61, 83) and region.mask.sum() == region.area
        x, y = region.point
        assert region.mask[y, x] and abs(full[region.class_id, y, x].item() - region.peak_score) < 1e-5
        assert region.peak_score == pytest.approx(full[region.class_id][region.mask].max().item(), abs=1e-6)
        assert region.score == pytest.approx(full[region.class_id][region.mask].mean().item(), abs=1e-5)
        bx, by, bw, bh = region.bbox
        assert region.mask[by:by + bh, bx:bx + bw].sum() == region.area
        assert region.mask[by, :].any() and region.mask[by + bh - 1, :].any()


def test_background_threshold_and_min_area():
    sims = torch.zeros(2, 4, 4)
    sims[0, :2] = 0.3  # class 0 clearly wins in the top half, the bottom half is a tie (p = 0.5)
    labels, regions = label_image(sims, (4, 4), LabelingThresholds(logit_scale=100.0, background_threshold=0.6))
    assert (labels[:2] == 0).all() and (labels[2:] == BACKGROUND).all()
    assert [r.class_id for r in regions] == [0]
    _, regions = label_image(sims, (4, 4), LabelingThresholds(background_threshold=0.6, min_area=9))
    assert regions == []
    with pytest.raises(ValueError):
        LabelingThresholds(background_threshold=1.5)


def test_label_real_photo_at_original_resolution(segmenter):
    image = Image.open(DATA / "voc" / "0_image.png")
    vocab = segmenter.vocabulary(["person", "dog", "sofa"])
    (regions,) = segmenter.label([image.crop((0, 0, 500, 333))], vocab, input_size=(224, 224))
    assert regions and sum(r.area for r in regions) == 500 * 333
    assert all(r.mask.shape == (333, 500) for r in regions)


def test_bf16_autocast_stays_close_to_fp32():
    clip = load_clip("gemref-tiny", None, "cpu")
    clip.model.load_state_dict(reference_state_dict())
    fp32 = GEMSegmenter(clip, device="cpu", precision="fp32")
    bf16 = GEMSegmenter(clip, device="cpu", precision="bf16")
    images = torch.randn(1, 3, 64, 64)
    a = fp32.patch_similarities(images, fp32.vocabulary(["cat", "dog"]))
    b = bf16.patch_similarities(images, bf16.vocabulary(["cat", "dog"]))
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    with pytest.raises(ValueError, match="precision"):
        GEMSegmenter(clip, device="cpu", precision="int3")


def test_local_checkpoint_path_loads_the_weights(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(reference_state_dict(), path)
    clip = load_clip("gemref-tiny", str(path), "cpu")
    torch.testing.assert_close(clip.model.visual.proj, reference_state_dict()["visual.proj"])


def test_missing_local_path_and_unknown_tag_fail_clearly(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="local checkpoint path"):
        load_clip("ViT-B-16", str(tmp_path / "missing.pt"), "cpu")
    with pytest.raises(WeightsUnavailableError, match="openai"):
        load_clip("ViT-B-16", "not-a-tag", "cpu")


def test_offline_tag_fails_fast_with_a_hint():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="local path") as info:
        load_clip("ViT-B-32", "openai", "cpu")
    assert time.monotonic() - start < 30
    message = str(info.value)
    # the whole reason on one line: what to download, from which hub repo, and the random-weights way
    assert "\n" not in message and message.endswith("(a smoke run: the labels are meaningless)"), message
    assert "open_clip_pytorch_model.bin from Hugging Face hub repo timm/vit_base_patch32_clip_224.openai" in message
    assert "pretrained 'none'" in message


def test_library_errors_name_the_argument_not_a_command_line_flag(tmp_path):
    """A Python user calls load_clip(pretrained=...): no message tells them to pass a flag."""
    (tmp_path / "empty.pt").write_bytes(b"")
    from gem.loading import check_checkpoint_file
    cases = [lambda: load_clip("ViT-B-32", "openai", "cpu"), lambda: load_clip("ViT-B-16", "not-a-tag", "cpu"),
             lambda: check_checkpoint_file(str(tmp_path / "empty.pt"))]
    for case in cases:
        with pytest.raises(WeightsUnavailableError) as info:
            case()
        assert "--" not in str(info.value) and "pretrained" in str(info.value), info.value


def test_non_vit_models_are_rejected_naming_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        load_clip("RN50", None, "cpu")
    with pytest.raises(UnsupportedModelError, match="ViT-B-16"):
        load_clip("coca_ViT-B-32", None, "cpu")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Nope", None, "cpu")
    with pytest.raises(ValueError, match="depth"):
        GEMSegmenter(load_clip("gemref-tiny", None, "cpu"), GEMSettings(depth=99), device="cpu")
    model = open_clip.create_model("RN50")
    from gem.vision import GEMVisionTower
    with pytest.raises(UnsupportedModelError):
        GEMVisionTower(model.visual)
