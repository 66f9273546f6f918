"""ProxyCLIP (method proxyclip) reproduces the published reference code's golden outputs
(tests/data/proxyclip-reference, see its README): text embeddings, the VFMs' positional
interpolation and features, CLIP's proxy-attention output, logits, sliding windows with their
padding, class probabilities and label maps; then its invariants at sizes the fixture lacks."""
import pytest
import torch
import torch.nn.functional as F

import open_clip
from gem import GEMSegmenter, GEMSettings, LabelingThresholds, WeightsUnavailableError
from gem.dense import BACKGROUND, class_probabilities
from gem.heads import resample_positions_dino
from gem.loading import LoadedCLIP
from gem.positional import resample_positional_embedding
from gem.preprocess import OPENAI_MEAN, OPENAI_STD
from gem.proxyclip import ProxyCLIPTower, proxy_attention, value_grid
from gem.segmenter import InferenceSettings
from gem.settings import ProxyCLIPSettings, VFMSettings
from gem.templates import resolve_templates
from gem.vfm import VFMFeatures, build_vfm, check_vfm_weights, convert_state_dict, load_vfm
from gem.vocabulary import Vocabulary
from gem.windows import SlideWindows, padding, window_boxes
from tests.models import PROXYCLIP_REFERENCE as FIXTURE, PROXYCLIP_VFM_ARCH, PROXYCLIP_VFMS

CASES = torch.load(FIXTURE / "cases.pt", weights_only=True)
TEXT = CASES["text"]
TOLERANCE = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_clip() -> LoadedCLIP:
    model = open_clip.create_model("proxyclipref-tiny", pretrained=str(FIXTURE / "clip_weights.pt"))
    return LoadedCLIP(model.float().eval(), open_clip.get_tokenizer("proxyclipref-tiny"), OPENAI_MEAN, OPENAI_STD)


def reference_vfm(kind: str) -> VFMFeatures:
    """The fixture's DINO / DINOv2, its state dict in the original repositories' key names."""
    vfm = build_vfm(PROXYCLIP_VFMS[kind], PROXYCLIP_VFM_ARCH)
    vfm.model.load_state_dict(convert_state_dict(torch.load(FIXTURE / f"{kind}_weights.pt"), vfm))
    return vfm.eval()


@pytest.fixture(scope="module")
def clip() -> LoadedCLIP:
    return reference_clip()


@pytest.fixture(scope="module")
def vfms() -> dict:
    return {kind: reference_vfm(kind) for kind in PROXYCLIP_VFMS}


@pytest.fixture(scope="module")
def vocabulary(clip):
    """The class lines with the 80 templates (encoded once: any segmenter of this CLIP can use it)."""
    return segmenter_for(clip, None).vocabulary(class_entries(), "imagenet80")


def segmenter_for(clip: LoadedCLIP, vfm, slide: bool = False, **proxy) -> GEMSegmenter:
    """vfm None: CLIP's plain last block (the fixture's ``none`` cases)."""
    settings = GEMSettings(method="proxyclip", proxyclip=ProxyCLIPSettings(**proxy))
    inference = InferenceSettings(slide=SlideWindows(224, 112) if slide else None)
    segmenter = GEMSegmenter(clip, settings, device="cpu", precision="fp32", inference=inference,
                             vfm=vfm if vfm is not None else build_vfm("dino_vitb8", PROXYCLIP_VFM_ARCH))
    if vfm is None:
        segmenter.tower.vfm = None
    return segmenter


def class_entries() -> list[list[str]]:
    """The class file's lines split as the reference splits them, on '; '."""
    return [line.split("; ") for line in TEXT["class_lines"]]


# ---- text ----

def test_text_embeddings_match_reference(clip, vocabulary):
    assert list(vocabulary.words) == TEXT["query_words"]
    assert vocabulary.word_class.tolist() == TEXT["query_idx"]
    assert relative_error(vocabulary.embeddings, TEXT["text_embeddings"]) < TOLERANCE
    prompts = [template.format(TEXT["query_words"][0]) for template in resolve_templates("imagenet80")]
    tokens = clip.tokenizer(prompts)
    assert torch.equal(tokens, TEXT["template_tokens_word0"])
    with torch.no_grad():
        assert relative_error(clip.model.encode_text(tokens), TEXT["template_features_word0"]) < TOLERANCE


# ---- positional interpolation ----

@pytest.mark.parametrize("index", range(len(CASES["pos_interp"])))
def test_positional_interpolation_matches_reference(clip, vfms, index: int):
    case = CASES["pos_interp"][index]
    height, width = case["input_hw"]
    expected = case["pos_embed"]
    if case["model"] == "clip":
        tower = ProxyCLIPTower(clip.model.visual, None, OPENAI_MEAN, OPENAI_STD)
        grid = tower.grid_for(height, width)
        actual = tower._positions(grid, height == width, torch.float32)
    else:
        vfm = vfms[case["model"]]
        grid = vfm.grid_for(height, width)
        rows = vfm.positional_embedding(grid, height == width)
        raw = torch.load(FIXTURE / f"{case['model']}_weights.pt")["pos_embed"][0].float()
        # the class row is used as is; timm folds DINOv2's into the class token
        assert torch.equal(expected[0], raw[0])
        if vfm.class_position() is None:
            raw_cls = torch.load(FIXTURE / "dinov2_weights.pt")["cls_token"].float()
            assert torch.equal(vfm.model.cls_token.detach(), raw_cls + raw[0])
        actual = torch.cat((raw[:1], rows))
    assert list(grid) == case["grid"]
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < TOLERANCE


def test_positional_interpolation_is_each_references_own(clip, vfms):
    """The three resamplings differ: a DINOv2 without antialias, a CLIP or DINO resized to the plain
    grid size, or a skipped resampling of a non-square input at the native grid, would be caught."""
    by_model = {(c["model"], tuple(c["grid"])): c["pos_embed"] for c in CASES["pos_interp"]}
    v2 = vfms["dinov2"].model.pos_embed.detach()[0]
    plain = F.interpolate(v2.reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(8, 16), mode="bicubic")
    assert relative_error(plain.flatten(2)[0].T, by_model[("dinov2", (8, 16))][1:]) > 1e-3
    clip_pos = clip.model.visual.positional_embedding.detach()
    timm_style = resample_positional_embedding(clip_pos, (14, 14), (7, 14))
    assert relative_error(timm_style, by_model[("clip", (7, 14))]) > 1e-3
    # a non-square input whose grid is the native one is still resampled (by 0.1 / 14 of a patch)
    forced = resample_positions_dino(clip_pos, (14, 14), (14, 14), force=True)
    assert 0 < relative_error(forced, clip_pos) < 0.1
    tower = ProxyCLIPTower(clip.model.visual, None, OPENAI_MEAN, OPENAI_STD)
    assert torch.equal(tower._positions((14, 14), False, torch.float32), forced)
    assert torch.equal(tower._positions((14, 14), True, torch.float32), clip_pos)


# ---- dense ----

@pytest.mark.parametrize("index", range(len(CASES["dense"])),
                         ids=[f"{c['vfm']}-{c['size']}" for c in CASES["dense"]])
def test_dense_outputs_match_reference(clip, vfms, vocabulary, index: int):
    case = CASES["dense"][index]
    segmenter = segmenter_for(clip, vfms.get(case["vfm"]))
    image = CASES["dense_images"][case["image_index"]].float()
    if case["ex_feats"] is not None:
        with torch.no_grad():
            features = segmenter.tower.vfm_features(image)
        assert features.shape == case["ex_feats"].shape
        assert relative_error(features, case["ex_feats"]) < TOLERANCE
    tokens = segmenter.tokens(image)
    assert list(tokens.grid) == case["grid"] and tokens.prefix == 0
    assert tokens.gem.shape == case["features"].shape
    assert relative_error(tokens.gem, case["features"]) < TOLERANCE
    logits = segmenter.patch_similarities(image, vocabulary)
    assert logits.shape == case["logits_grid"].shape
    assert relative_error(logits, case["logits_grid"]) < TOLERANCE
    if "logits" in case:  # crop-size logits, stored in fp16
        assert relative_error(segmenter.heatmaps(image, vocabulary).half(), case["logits"]) < TOLERANCE


def test_fixture_is_nontrivial(clip, vfms):
    """Proxy attention changes CLIP's output, and DINO's and DINOv2's proxies differ."""
    by_key = {(c["vfm"], c["size"]): c for c in CASES["dense"]}
    none = by_key[("none", 224)]["logits_grid"]
    for vfm in ("dino", "dinov2"):
        resized = F.interpolate(none, size=by_key[(vfm, 224)]["grid"], mode="bilinear")
        assert relative_error(by_key[(vfm, 224)]["logits_grid"], resized) > 0.05
    features = by_key[("dino", 224)]["ex_feats"]
    attention = proxy_attention(features)
    assert 0.2 < (attention == 0).float().mean() < 0.8  # masking removes a good share, not all


# ---- sliding windows ----

def labels_from_reference(pred: torch.Tensor) -> torch.Tensor:
    """The reference's ids (0: its first class line, or unconfident) -> ours with that line as
    background names (-1), the others classes 0...."""
    pred = pred.long() - 1
    return torch.where(pred < 0, torch.full_like(pred, BACKGROUND), pred)


@pytest.mark.parametrize("index", range(len(CASES["slides"])), ids=[s["name"] for s in CASES["slides"]])
def test_sliding_windows_match_reference(clip, vfms, vocabulary, index: int):
    case = CASES["slides"][index]
    segmenter = segmenter_for(clip, vfms[case["vfm"]], slide=True)
    image = CASES["slide_images"][case["image_index"]].float()[0]
    height, width = image.shape[-2:]
    boxes = window_boxes(height, width, case["crop"], case["stride"])
    assert [list(box) for box in boxes] == case["windows_y1y2x1x2"]
    pads = [list(padding(y2 - y1, x2 - x1, segmenter.pad_multiple)) for y1, y2, x1, x2 in boxes]
    assert segmenter.pad_multiple == case["pad_multiple"] and pads == case["pads_lrtb"]
    seen = []
    hook = segmenter.tower.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        (logits,) = segmenter.dense_logits([image], vocabulary)
    finally:
        hook.remove()
    assert [list(crop.shape[-2:]) for batch in seen for crop in batch] == case["crop_inputs_hw"]
    for batch, (left, right, top, bottom) in zip(seen, pads):  # padded with zeros in CLIP's space
        if top:
            assert batch[..., :top, :].abs().max() == 0 and batch[..., -bottom:, :].abs().max() == 0
    assert logits.shape == case["slide_logits"].shape[1:]
    assert relative_error(logits.half(), case["slide_logits"][0]) < TOLERANCE

    probs = class_probabilities(logits, vocabulary.word_class, len(vocabulary), case["logit_scale"])
    if "probs" in case:
        assert relative_error(probs.half(), case["probs"]) < TOLERANCE
    # label maps: the first line as background names, as the reference's class 0 (the same words:
    # the same logits, background rows last)
    lines = class_entries()
    background_words = [word for line in lines[1:] for word in line] + lines[0]
    order = [vocabulary.words.index(word) for word in background_words]
    background_vocabulary = Vocabulary(tuple(line[0] for line in lines[1:]), vocabulary.templates,
                                       vocabulary.embeddings[order], tuple(map(tuple, lines[1:])), tuple(lines[0]))
    assert list(background_vocabulary.words) == background_words
    logits_bg = logits[[vocabulary.words.index(word) for word in background_vocabulary.words]]
    thresholds = LabelingThresholds(logit_scale=float(case["logit_scale"]), background_threshold=case["prob_thd"])
    labels, regions = segmenter.regions(logits_bg, (height, width), background_vocabulary, thresholds)
    expected = labels_from_reference(case["pred"][0])
    top2 = probs.topk(2, dim=0).values
    decided = ((top2[0] - top2[1]) > 1e-3 * top2[0]) & ((top2[0] - case["prob_thd"]).abs() > 1e-3)
    assert decided.float().mean() > 0.98
    labels = torch.from_numpy(labels).long()
    assert torch.equal(labels[decided], expected[decided])
    assert (labels == expected).float().mean() > 0.999
    assert len(expected.unique()) >= 3


def test_padding_is_the_references(clip, vfms, vocabulary):
    """Without the padding to 56 the padded case is not reproduced (its 196 x 224 windows, not
    square, then need fix_nonsquare: the reference's DINOv2 branch fails on them)."""
    case = CASES["slides"][1]
    image = CASES["slide_images"][1].float()[0]
    segmenter = segmenter_for(clip, vfms["dinov2"], slide=True, pad_multiple=1, fix_nonsquare=True)
    (logits,) = segmenter.dense_logits([image], vocabulary)
    assert relative_error(logits, case["slide_logits"][0]) > 1e-3


# ---- loading from settings ----

def test_method_from_settings_loads_reference_checkpoints(clip, vfms, tmp_path):
    """GEMSettings(method="proxyclip") with a local checkpoint in the original key names gives the
    fixture's model; the VFM's normalisation is a setting."""
    image = CASES["dense_images"][0].float()
    for kind, name in PROXYCLIP_VFMS.items():
        vfm = VFMSettings(name=name, weights=str(FIXTURE / f"{kind}_weights.pt"), arch=PROXYCLIP_VFM_ARCH)
        settings = GEMSettings(method="proxyclip", proxyclip=ProxyCLIPSettings(vfm=vfm))
        segmenter = GEMSegmenter(clip, settings, device="cpu", precision="fp32")
        case = next(c for c in CASES["dense"] if c["vfm"] == kind and c["size"] == 224)
        assert relative_error(segmenter.tokens(image).gem, case["features"]) < TOLERANCE
    other = VFMSettings(name="dino_vitb8", weights=str(FIXTURE / "dino_weights.pt"), arch=PROXYCLIP_VFM_ARCH,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    segmenter = GEMSegmenter(clip, GEMSettings(method="proxyclip", proxyclip=ProxyCLIPSettings(vfm=other)),
                             device="cpu", precision="fp32")
    assert relative_error(segmenter.tokens(image).gem, CASES["dense"][0]["features"]) > 1e-3


def test_missing_vfm_weights_fail_with_what_to_pass(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        load_vfm(VFMSettings(weights=str(tmp_path / "absent.pth")))
    (tmp_path / "wrong.pt").write_bytes(b"")
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, tmp_path / "wrong.pt")
    with pytest.raises(WeightsUnavailableError, match="could not load VFM"):
        load_vfm(VFMSettings(weights=str(tmp_path / "wrong.pt"), arch=PROXYCLIP_VFM_ARCH))


def test_offline_hub_weights_fail_at_once_naming_a_local_path(monkeypatch):
    """No network and nothing cached: one error that says what to pass, no download retries."""
    monkeypatch.setattr("gem.vfm._reachable", lambda host, timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    with pytest.raises(WeightsUnavailableError, match="vfm.weights: /path/to"):
        load_vfm(VFMSettings(name="dinov2_vitb14_reg", weights="hub", arch=PROXYCLIP_VFM_ARCH))
    with pytest.raises(WeightsUnavailableError, match="vfm.weights: /path/to"):  # the driver's check, no model built
        check_vfm_weights(VFMSettings(name="dino_vitb8", weights="hub"))
    check_vfm_weights(VFMSettings(weights=str(FIXTURE / "dino_weights.pt")))
    check_vfm_weights(VFMSettings(weights="none"))


# ---- the reference's non-square quirk, and its fix ----

def test_nonsquare_crops_as_the_reference_or_fixed(clip, vfms):
    image = torch.randn(1, 3, 224, 336, generator=torch.Generator().manual_seed(0))
    quirky = segmenter_for(clip, vfms["dino"])
    with torch.no_grad():
        folded = quirky.tower.vfm_features(image)
    assert folded.shape == (1, 144, 28, 28)  # the README's example: tokens folded into channels
    assert quirky.tokens(image).grid == (28, 28)
    with pytest.raises(ValueError, match="fix_nonsquare"):
        segmenter_for(clip, vfms["dinov2"]).tokens(image)
    for kind, grid in (("dino", (28, 42)), ("dinov2", (16, 24))):
        fixed = segmenter_for(clip, vfms[kind], fix_nonsquare=True)
        tokens = fixed.tokens(image)
        assert tokens.grid == grid and tokens.gem.shape == (1, grid[0] * grid[1], 64)
    # square crops are the same either way
    square = CASES["dense_images"][0].float()
    torch.testing.assert_close(segmenter_for(clip, vfms["dino"], fix_nonsquare=True).tokens(square).gem,
                               quirky.tokens(square).gem)


# ---- invariants at sizes the fixture does not have ----

@pytest.fixture(scope="module")
def micro_clip() -> LoadedCLIP:
    """Another CLIP: 4 blocks of width 64, patch 32, random weights."""
    torch.manual_seed(3)
    model = open_clip.create_model("gemtest-micro")
    return LoadedCLIP(model.eval(), open_clip.get_tokenizer("gemtest-micro"), OPENAI_MEAN, OPENAI_STD)


@pytest.mark.parametrize("name, arch, size, grid", [
    ("dinov2_vitb14_reg", dict(embed_dim=48, depth=2, num_heads=2, img_size=98), (126, 126), (9, 9)),
    ("dino_vitb16", dict(embed_dim=32, depth=1, num_heads=4, img_size=64), (96, 96), (6, 6)),
    ("dino_vitb8", dict(embed_dim=32, depth=2, num_heads=2, img_size=64, patch_size=4), (40, 40), (10, 10)),
])
def test_invariants_at_other_sizes(micro_clip, name, arch, size, grid):
    torch.manual_seed(4)
    vfm = build_vfm(name, arch)
    segmenter = GEMSegmenter(micro_clip, GEMSettings(method="proxyclip"), device="cpu", precision="fp32", vfm=vfm)
    images = torch.randn(3, 3, *size)
    vocabulary = segmenter.vocabulary(["cat", "dog", "sky"])
    tokens = segmenter.tokens(images)
    assert tokens.grid == grid == vfm.grid_for(*size)  # the output is on the VFM's grid
    assert tokens.gem.shape == (3, grid[0] * grid[1], 32)
    sims = segmenter.patch_similarities(images, vocabulary)
    for i in range(3):  # per-image mean(S): a batch is its images one at a time
        torch.testing.assert_close(sims[i:i + 1], segmenter.patch_similarities(images[i:i + 1], vocabulary),
                                   rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        features = segmenter.tower.vfm_features(images)
    attention = proxy_attention(features)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, grid[0] * grid[1]))
    tokens_n = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)
    similarity = tokens_n @ tokens_n.transpose(1, 2)
    masked = similarity < 1.2 * similarity.mean(dim=(1, 2), keepdim=True)
    assert attention[masked].abs().max() == 0 and (attention[~masked] > 0).all()


def test_orthogonal_proxies_give_each_patch_its_own_value(micro_clip):
    """With one-hot VFM features S is the identity, every off-diagonal entry is masked, and the last
    block returns out_proj of CLIP's values resized to the VFM grid, then ln_post and proj."""
    vfm = build_vfm("dino_vitb8", dict(embed_dim=32, depth=1, num_heads=2, img_size=64))
    tower = ProxyCLIPTower(micro_clip.model.visual, vfm, OPENAI_MEAN, OPENAI_STD)
    grid = (5, 7)
    tower.vfm_features = lambda images: torch.eye(35).reshape(1, 35, *grid).expand(images.shape[0], -1, -1, -1)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = tower(images)
        assert torch.equal(proxy_attention(torch.eye(35).reshape(1, 35, *grid)), torch.eye(35)[None])
        x, clip_grid = tower.embed(images)
        for block in tower.visual.transformer.resblocks[:-1]:
            x = block(x.transpose(0, 1)).transpose(0, 1) if not block.attn.batch_first else block(x)
        last = tower.visual.transformer.resblocks[-1]
        width = x.shape[-1]
        values = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        expected = tower.visual.ln_post(last.attn.out_proj(value_grid(values[:, 1:], clip_grid, grid, True)))
        expected = expected @ tower.visual.proj
    assert out.grid == grid
    torch.testing.assert_close(out.gem, expected, rtol=1e-4, atol=1e-5)


def test_padded_windows_at_other_sizes(micro_clip):
    """Windows smaller than the crop are padded to the multiple and cut back: logits cover the image."""
    vfm = build_vfm("dinov2_vitb14_reg", dict(embed_dim=32, depth=1, num_heads=2, img_size=70))
    settings = GEMSettings(method="proxyclip", proxyclip=ProxyCLIPSettings(pad_multiple=28, fix_nonsquare=True))
    segmenter = GEMSegmenter(micro_clip, settings, device="cpu", precision="fp32", vfm=vfm,
                             inference=InferenceSettings(slide=SlideWindows(112, 56)))
    seen = []
    segmenter.tower.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    image = torch.randn(3, 100, 150)
    (logits,) = segmenter.dense_logits([image], segmenter.vocabulary(["cat", "dog"]))
    assert logits.shape == (2, 100, 150) and torch.isfinite(logits).all()
    assert set(seen) == {(112, 112)}  # 100 x 112 windows padded by (6, 6) rows
    assert padding(100, 112, 28) == (0, 0, 6, 6) and padding(101, 112, 28) == (0, 0, 5, 6)


def test_sam_image_encoder_as_the_proxy(micro_clip):
    """SAM's encoder fits the same interface: the crop resized to its input, its fixed grid out
    (not checked against a reference: the fixture has no SAM proxy)."""
    arch = dict(image_size=128, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                encoder_global_attn_indexes=[0], prompt_embed_dim=32, decoder_num_heads=4)
    vfm = load_vfm(VFMSettings(name="sam_vit_b", weights="none", arch=arch))
    assert vfm.family == "sam" and vfm.grid_for(64, 96) == (8, 8) and vfm.dim == 32
    segmenter = GEMSegmenter(micro_clip, GEMSettings(method="proxyclip"), device="cpu", precision="fp32", vfm=vfm)
    tokens = segmenter.tokens(torch.randn(2, 3, 96, 96))
    assert tokens.grid == (8, 8) and tokens.gem.shape == (2, 64, 32) and torch.isfinite(tokens.gem).all()
