"""The NACLIP-family heads, sliding windows, synonyms + background and PAMR reproduce the NACLIP
reference code's golden outputs (tests/data/naclip-reference, see its README)."""
import pytest
import torch

from gem import GEMSegmenter, GEMSettings, LabelingThresholds
from gem.dense import BACKGROUND, class_probabilities, renormalise
from gem.heads import LastBlockTower
from gem.loading import LoadedCLIP
from gem.pamr import PAMRSettings, refine
from gem.positional import resample_positional_embedding
from gem.segmenter import InferenceSettings
from gem.windows import SlideWindows
from tests.models import DATA

import open_clip

FIXTURE = DATA / "naclip-reference"
CASES = torch.load(FIXTURE / "cases.pt", weights_only=False)
SLIDE = CASES["slide"]
METHOD = {"naclip": "naclip", "kk": "kk", "csa": "sclip", "vanilla": "vanilla"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_clip() -> LoadedCLIP:
    state = torch.load(FIXTURE / "openai_state_dict.pt")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = open_clip.model.build_model_from_openai_state_dict(state).float().eval()
    return LoadedCLIP(model, open_clip.get_tokenizer("ViT-B-16"), (0.0,) * 3, (1.0,) * 3)


@pytest.fixture(scope="module")
def clip() -> LoadedCLIP:
    return reference_clip()


@pytest.mark.parametrize("index", range(len(CASES["cases"])))
def test_dense_tokens_match_reference(clip, index: int):
    case = CASES["cases"][index]
    settings = GEMSettings(method=METHOD[case["attn_strategy"]], gaussian_std=case["gaussian_std"] or 5.0)
    segmenter = GEMSegmenter(clip, settings, device="cpu", precision="fp32")
    image = CASES["dense_images"][case["image_index"]].float()
    tokens = segmenter.tokens(image).gem
    assert tokens.shape == case["tokens"].shape
    assert relative_error(tokens, case["tokens"]) < 1e-4


def test_fixture_is_nontrivial(clip):
    """The heads differ from each other and the non-square case needs the DINO-style positions:
    GEM's (timm, antialiased) resampling would not reproduce it."""
    by_key = {(c["attn_strategy"], c["image_index"]): c["tokens"] for c in CASES["cases"]}
    for strategy in ("naclip", "kk", "csa"):
        assert relative_error(by_key[(strategy, 0)], by_key[("vanilla", 0)]) > 0.05
    assert relative_error(by_key[("naclip", 0)], by_key[("kk", 0)]) > 1e-3
    tower = LastBlockTower(clip.model.visual, "naclip")
    tower._positional_embedding = lambda grid, dtype: resample_positional_embedding(
        clip.model.visual.positional_embedding, tuple(clip.model.visual.grid_size), grid).to(dtype)
    with torch.no_grad():
        timm_style = tower(CASES["dense_images"][1].float()).gem
    assert relative_error(timm_style, by_key[("naclip", 1)]) > 1e-3


def slide_segmenter(clip: LoadedCLIP, pamr: bool) -> GEMSegmenter:
    inference = InferenceSettings(slide=SlideWindows(SLIDE["crop"], SLIDE["stride"]),
                                  pamr=PAMRSettings(SLIDE["pamr"]["steps"], SLIDE["pamr"]["dilations"]) if pamr else None)
    settings = GEMSettings(method=METHOD[SLIDE["attn_strategy"]], gaussian_std=SLIDE["gaussian_std"])
    return GEMSegmenter(clip, settings, device="cpu", precision="fp32", inference=inference)


def reference_vocabulary(segmenter: GEMSegmenter):
    """The fixture's class lines: the first is background names, the others classes with synonyms."""
    lines = [line.split(", ") for line in SLIDE["class_lines"]]
    return segmenter.vocabulary(lines[1:], "imagenet80", background=lines[0])


def reorder_words(tensor: torch.Tensor, vocabulary) -> torch.Tensor:
    """The reference's word order (background names first) -> ours (classes first)."""
    order = [SLIDE["query_words"].index(word) for word in vocabulary.words]
    return tensor[order]


def expected_labels(pred: torch.Tensor) -> torch.Tensor:
    """Reference class ids (0 = background) -> ours (-1 = background)."""
    pred = pred.long() - 1
    return torch.where(pred < 0, torch.full_like(pred, BACKGROUND), pred)


def tie_free(probs: torch.Tensor) -> torch.Tensor:
    """Pixels where the reference's top two probabilities differ by more than fp16 rounding."""
    top2 = probs.float().topk(2, dim=0).values
    return (top2[0] - top2[1]) > 2e-3 * top2[0]


def check_labels(labels: torch.Tensor, reference_pred: torch.Tensor, reference_probs: torch.Tensor):
    expected = expected_labels(reference_pred)
    decided = tie_free(reference_probs)
    assert decided.float().mean() > 0.95
    assert torch.equal(labels[decided], expected[decided])
    assert len(set(expected.unique().tolist())) >= 3  # several classes and background occur


def test_sliding_window_synonyms_background_match_reference(clip):
    segmenter = slide_segmenter(clip, pamr=False)
    vocabulary = reference_vocabulary(segmenter)
    assert relative_error(vocabulary.embeddings, reorder_words(SLIDE["text_embeddings"], vocabulary)) < 1e-4
    image = CASES["slide_image"].float()
    (logits,) = segmenter.dense_logits([image[0]], vocabulary)
    reference_logits = reorder_words(SLIDE["slide_logits"][0], vocabulary)
    assert logits.shape == reference_logits.shape
    assert relative_error(logits.half(), reference_logits) < 1e-4

    groups = len(vocabulary) + 1
    probs = class_probabilities(logits, vocabulary.word_class, groups, SLIDE["logit_scale"])
    # ours: classes then background; the reference's: background first
    ours_in_reference_order = renormalise(torch.cat((probs[-1:], probs[:-1])))
    assert relative_error(ours_in_reference_order.half(), SLIDE["probs"]) < 1e-4

    thresholds = LabelingThresholds(logit_scale=SLIDE["logit_scale"], background_threshold=SLIDE["prob_thd"])
    labels, regions = segmenter.regions(logits, tuple(image.shape[-2:]), vocabulary, thresholds, image[0])
    check_labels(torch.from_numpy(labels).long(), SLIDE["pred"][0], SLIDE["probs"])
    assert [vocabulary.class_names[r.class_id] for r in regions] == [
        name for i, name in enumerate(vocabulary.class_names) if (labels == i).any()]


def test_pamr_matches_reference(clip):
    segmenter = slide_segmenter(clip, pamr=True)
    vocabulary = reference_vocabulary(segmenter)
    image = CASES["slide_image"].float()[0]
    (logits,) = segmenter.dense_logits([image], vocabulary)
    settings = segmenter.inference.pamr
    refined = refine(image, logits, settings)
    reference = reorder_words(SLIDE["pamr_logits"][0], vocabulary)
    assert relative_error(refined.half(), reference) < 1e-4
    assert relative_error(logits.half(), reference) > 1e-3  # PAMR changed something

    groups = len(vocabulary) + 1
    probs = renormalise(class_probabilities(refined, vocabulary.word_class, groups, SLIDE["logit_scale"]))
    reference_probs = torch.cat((probs[-1:], probs[:-1]))
    thresholds = LabelingThresholds(logit_scale=SLIDE["logit_scale"], background_threshold=SLIDE["prob_thd"])
    # Banded PAMR (small bands: many halos) gives the whole-image PAMR's labels.
    from gem.dense import top_class_bands
    bands = list(top_class_bands(logits, tuple(image.shape[-2:]), vocabulary.word_class, len(vocabulary),
                                 thresholds.logit_scale, thresholds.background_threshold, settings, image,
                                 band_rows=64))
    assert len(bands) == 5  # 272 rows: halos clipped at the image's edges and cut inside it
    labels = torch.cat([band for _, _, band in bands]).long()
    check_labels(labels, SLIDE["pamr_pred"][0], reference_probs)
    whole, _ = segmenter.regions(logits, tuple(image.shape[-2:]), vocabulary, thresholds, image)
    assert torch.equal(torch.from_numpy(whole).long(), labels)
