"""A real labeling job with a NACLIP head, short-side resize, sliding windows, synonyms,
background names and PAMR: local Ray cluster, tar shards, Parquet read back, RLE decoded."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gem import LabelingThresholds
from pipeline.config import ConfigError, load_config
from pipeline.store.rle import decode_mask
from pipeline.worker.inference import segmenter_settings
from pipeline.driver.plan import build_spec
from pipeline.driver.run import run_labeling
from pipeline.store.schema import run_metadata_of
from pipeline.worker.labeler import load_segmenter
from tests.outputs import all_rows, check_labels, read_tables
from tests.shards import encode, photo, write_shard

NACLIP_SETTINGS = {
    "vocab": [["person", "man", "woman"], "dog", ["sofa", "couch"], "car"],
    "background": ["sky", "wall", "floor"], "method": "naclip", "gaussian_std": 3.0,
    "resize": "short_side", "short_side": 96, "max_long_side": 160,
    "slide": {"crop": 64, "stride": 32}, "pamr": {"enabled": True, "steps": 3, "dilations": [2, 4]},
    "templates": ["a photo of a {}.", "a picture of a {}."],
    "thresholds": {"logit_scale": 40.0, "background_threshold": 0.1, "min_area": 1},
}
SIZES = [(150, 100), (97, 131), (120, 120), (181, 77), (64, 200)]


@pytest.mark.usefixtures("ray_session")
def test_naclip_slide_synonyms_background_pamr_job(base_config, tmp_path):
    images = [photo(i, size) for i, size in enumerate(SIZES)]
    write_shard(tmp_path / "in" / "photos.tar",
                [{"__key__": f"img-{i}", "png": encode(image, "PNG")} for i, image in enumerate(images)])
    config = load_config(None, {**base_config, **NACLIP_SETTINGS, "input": [str(tmp_path / "in" / "*.tar")],
                                "batch_size": 3})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.images, summary.image_errors) == (1, 5, 0)

    rows = sorted(all_rows(config.output), key=lambda row: row["key"])
    metadata = run_metadata_of(next(iter(read_tables(config.output).values())).schema)
    assert metadata["vocab"] == [["person", "man", "woman"], "dog", ["sofa", "couch"], "car"]
    assert metadata["background"] == ["sky", "wall", "floor"] and metadata["method"] == "naclip"
    assert metadata["slide"] == {"crop": 64, "stride": 32} and metadata["pamr"]["enabled"] is True

    # The same images through the library directly, with the worker's settings.
    spec = build_spec(config)
    segmenter = load_segmenter(spec, torch.device("cpu"))
    vocabulary = segmenter.vocabulary(spec.class_names, spec.templates, config.background)
    thresholds = LabelingThresholds(logit_scale=40.0, background_threshold=0.1, min_area=1)
    background_pixels = 0
    for row, image in zip(rows, images):
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == image.size
        check_labels(row)
        assert {label["name"] for label in row["labels"]} <= {"person", "dog", "sofa", "car"}
        inputs = segmenter.model_input(image)
        assert min(inputs.shape[-2:]) == 96 or max(inputs.shape[-2:]) == 160  # aspect ratio kept
        (logits,) = segmenter.dense_logits([inputs], vocabulary)
        label_map, regions = segmenter.regions(logits, (image.height, image.width), vocabulary, thresholds, inputs)
        assert [(r.class_id, r.area, r.point) for r in regions] == [
            (label["class_id"], label["area"], (label["point_x"], label["point_y"])) for label in row["labels"]]
        for label, region in zip(row["labels"], regions):
            assert np.array_equal(decode_mask(label["rle_size"], label["rle_counts"]), region.mask)
        background_pixels += int((label_map < 0).sum())
    assert background_pixels > 0  # the background names (or the threshold) took some pixels
    assert sum(len(row["labels"]) for row in rows) >= 5


def test_method_keys_change_the_fingerprint(base_config, tmp_path):
    plain = build_spec(load_config(None, {**base_config, "input": ["x.tar"]}))
    naclip = build_spec(load_config(None, {**base_config, **NACLIP_SETTINGS, "input": ["x.tar"]}))
    assert "method" not in plain.run_metadata and naclip.run_metadata["method"] == "naclip"
    assert plain.fingerprint != naclip.fingerprint
    less_background = {**NACLIP_SETTINGS, "background": ["sky", "wall"]}
    assert build_spec(load_config(None, {**base_config, **less_background, "input": ["x.tar"]})).fingerprint \
        != naclip.fingerprint


@pytest.mark.parametrize("overrides, message", [
    ({"method": "dino"}, "method: one of 'gem', 'naclip'"),
    ({"resize": "long_side"}, "resize: one of 'square', 'short_side'"),
    ({"slide": {"crop": 64, "stride": 65}}, "slide: need crop >= 16 and 1 <= stride <= crop"),
    ({"slide": {"stride": 32}}, "slide.stride: give slide.crop too"),
    ({"pamr": {"enabled": True, "dilations": [0]}}, "pamr: need steps >= 1 and positive dilations"),
    ({"vocab": [["person", "man"], "man"]}, "vocab: the vocabulary repeats class names"),
    ({"vocab": ["sky"], "background": ["sky"]}, "vocab: the vocabulary repeats class names"),
    ({"gem": {"method": "naclip"}}, "gem: method and gaussian_std are top-level keys"),
    ({"slide": {"crop": 64, "strid": 32}}, r"unknown key slide.strid \(known: crop, stride\)"),
    ({"gem": {"depht": 2}}, r"unknown key gem.depht \(known: depth, inv_temperature, iters\)"),
])
def test_bad_method_keys_are_one_line_errors(base_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_spec(load_config(None, {**base_config, **overrides, "input": ["x.tar"]}))


def test_vocab_file_lines_hold_synonyms(base_config, tmp_path):
    vocab_file = tmp_path / "classes.txt"
    vocab_file.write_text("person, man, woman\ndog\n# comment\nsofa,couch\n")
    spec = build_spec(load_config(None, {**{k: v for k, v in base_config.items() if k != "vocab"},
                                         "vocab_file": str(vocab_file), "input": ["x.tar"]}))
    assert spec.class_names == [["person", "man", "woman"], "dog", ["sofa", "couch"]]


PRESETS = sorted((Path(__file__).parent.parent / "jobs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_validate(preset, tmp_path):
    """Each preset loads as ``gemlabel label --config`` would, and maps onto library settings; a
    ``METHOD-sam`` preset is METHOD's with SAM refinement."""
    from jobs.cli import _parser
    from jobs.flags import overrides as _overrides
    args = _parser().parse_args(["label", "--config", str(preset), "--input", "x.tar", "--output", str(tmp_path),
                                 "--vocab", "person|man,dog", "--background", "sky,wall"])
    config = load_config(args.config, _overrides(args))
    method, _, refine = preset.stem.partition("-")
    assert config.method == method and config.refine == (refine or "none") and config.templates == "imagenet80"
    assert config.vocab == [["person", "man"], "dog"] and config.background == ["sky", "wall"]
    head, inference = segmenter_settings(config)
    assert head.method == method and inference.resize.mode == "short_side"
    assert inference.slide is not None
    assert (inference.pamr is not None) == (preset.stem == "naclip")
    assert not preset.read_text().startswith("# DRAFT")


def test_config_methods_are_the_library_methods():
    from gem.segmenter import METHODS as LIBRARY_METHODS
    from pipeline.config.label_config import METHODS
    assert METHODS == LIBRARY_METHODS


def test_outputs_with_synonyms_read_back_as_labels_and_calibrate_refuses_them(base_config):
    """eval and export see each class by its label (first name); calibrate's whole-image cache
    cannot hold synonyms, background names, windows or PAMR, so it says so instead of ignoring them."""
    from jobs.quality_cli import _check_calibratable
    from pipeline.config import class_labels
    assert class_labels([["person", "man"], "dog"]) == ["person", "dog"]
    _check_calibratable(load_config(None, {**base_config, "input": ["x.tar"], "method": "naclip"}))
    with pytest.raises(ConfigError, match="calibrate: not supported with background, slide, pamr, vocab synonyms"):
        _check_calibratable(load_config(None, {**base_config, **NACLIP_SETTINGS, "resize": "square",
                                               "short_side": 448, "max_long_side": 2048, "input": ["x.tar"]}))


@pytest.mark.parametrize("overrides, message", [
    ({"resize": "short_side", "short_side": 16}, "short_side: gemtest-micro uses 32-pixel patches, so short_side "
                                                 "must be at least 32; got 16"),
    ({"slide": {"crop": 16, "stride": 16}}, "slide.crop: gemtest-micro uses 32-pixel patches, so the crop must be "
                                            "at least 32; got 16"),
])
def test_sizes_below_the_patch_are_refused_in_the_driver(base_config, tmp_path, overrides, message):
    """Issue 18.16: was accepted, and every image became an error row (exit 0)."""
    from pipeline.driver.plan import check_model
    config = load_config(None, {**base_config, **overrides, "input": ["x.tar"]})
    with pytest.raises(ConfigError, match=message):
        check_model(config)


def test_slide_windows_on_images_thinner_than_a_patch_label_every_image(base_config, tmp_path):
    """Issue 18.16: a 20000 x 20 image capped at max_long_side is 2 pixels high: it is given at
    least a patch in each side (was an error row: kernel size can't be greater than the input)."""
    from pipeline.io.shards import Shard
    from pipeline.worker.labeler import ShardLabeler
    from tests.outputs import all_rows, check_labels
    from tests.shards import encode, photo, write_shard
    sizes = [(37, 101), (101, 37), (20000, 20), (20, 20000), (300, 200)]
    url = str(write_shard(tmp_path / "s.tar", [{"__key__": f"k{w}x{h}", "png": encode(photo(i, (w, h)), "PNG")}
                                               for i, (w, h) in enumerate(sizes)]))
    for name, extra in {"short_side": {"resize": "short_side", "short_side": 64, "max_long_side": 512},
                        "square": {"input_size": [64, 64]}}.items():
        output = str(tmp_path / name)
        config = load_config(None, {**base_config, **extra, "input": [url], "output": output,
                                    "slide": {"crop": 48, "stride": 32}})
        ShardLabeler(build_spec(config), device="cpu", torch_threads=1).label_shard(Shard(url, "s-0"))
        rows = all_rows(output)
        assert [(r["width"], r["height"], r["status"]) for r in rows] == [(w, h, "ok") for w, h in sizes], rows
        for row in rows:
            check_labels(row)
