"""GEM reproduces the published reference implementation (gem_torch 1.0.1) on its golden cases."""
import pytest
import torch

from gem import GEMSegmenter, GEMSettings
from gem.loading import LoadedCLIP
from tests.models import REFERENCE, reference_state_dict

import open_clip

CASES = torch.load(REFERENCE / "cases.pt", weights_only=False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_segmenter(setting: dict, fast: bool) -> GEMSegmenter:
    model = open_clip.create_model("gemref-tiny")
    model.load_state_dict(reference_state_dict())
    clip = LoadedCLIP(model, open_clip.get_tokenizer("gemref-tiny"), (0.0,) * 3, (1.0,) * 3)
    settings = GEMSettings(depth=setting["depth"], iters=setting["iters"], inv_temperature=setting["temp"])
    return GEMSegmenter(clip, settings, device="cpu", precision="fp32", fast=fast)


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "naive"])
@pytest.mark.parametrize("index", range(len(CASES["cases"])))
def test_matches_reference(index: int, fast: bool):
    case = CASES["cases"][index]
    segmenter = reference_segmenter(case["setting"], fast)
    image = CASES["images"][case["image_index"]].float()
    vocabulary = segmenter.vocabulary(case["texts"], case["prompt_template"])

    tokens = segmenter.tokens(image, keep_original=True)
    heatmap = segmenter.heatmaps(image, vocabulary)
    heatmap_minmax = segmenter.heatmaps(image, vocabulary, normalize=True)

    assert tokens.gem.shape == case["feat_gem"].shape
    assert relative_error(tokens.gem, case["feat_gem"]) < 1e-4
    assert relative_error(tokens.original, case["feat_ori"]) < 1e-4
    assert relative_error(vocabulary.embeddings, case["text_embeddings"]) < 1e-4
    assert heatmap.shape == case["heatmap_raw"].shape
    # The golden heatmaps are stored in fp16: compare at that precision.
    assert relative_error(heatmap.half(), case["heatmap_raw"]) < 1e-4
    assert relative_error(heatmap_minmax.half(), case["heatmap_minmax"]) < 1e-4


def test_reference_fixture_is_nontrivial():
    """GEM features differ from the original path's: the fixture would catch a no-op GEM."""
    for case in CASES["cases"]:
        assert relative_error(case["feat_gem"], case["feat_ori"]) > 0.05
