"""ProxyCLIP and SAM refinement in the pipeline (issue 21, items 4-5): their config keys, the
driver's weight checks, and real labeling jobs (tar shards, a local Ray cluster, Parquet read
back and RLE decoded) with tiny random VFM and SAM models."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.driver.plan import build_spec

# Tiny random models for pipeline tests: DINO ViT/8 and SAM at a fraction of their size.
TINY_VFM = {"name": "dino_vitb8", "weights": "none", "arch": {"embed_dim": 48, "depth": 2, "num_heads": 2}}
TINY_SAM = {"model": "vit_b", "weights": "none", "minimal_area": 4, "iou_thresh": -100.0,
            "arch": {"image_size": 256, "encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 1,
                     "encoder_global_attn_indexes": [0], "window_size": 4, "prompt_embed_dim": 32,
                     "decoder_mlp_dim": 64, "iou_head_hidden_dim": 32}}


def _config(base_config, **keys):
    return load_config(None, {**base_config, "input": ["x.tar"], **keys})


def test_new_sections_enter_the_fingerprint_only_when_used(base_config):
    plain = build_spec(_config(base_config))
    assert not {"proxyclip", "refine", "sam", "vfm_weights_content", "sam_weights_content"} & set(plain.source)
    # an unused section changes nothing: the labels do not depend on it
    assert build_spec(_config(base_config, sam={"iou_thresh": 0.5})).fingerprint == plain.fingerprint
    assert build_spec(_config(base_config, proxyclip={"beta": 1.5})).fingerprint == plain.fingerprint
    proxy = build_spec(_config(base_config, method="proxyclip", proxyclip={"vfm": TINY_VFM}))
    assert proxy.source["proxyclip"]["vfm"]["arch"] == TINY_VFM["arch"] and "sam" not in proxy.source
    beta = build_spec(_config(base_config, method="proxyclip", proxyclip={"vfm": TINY_VFM, "beta": 1.5}))
    assert beta.fingerprint != proxy.fingerprint
    refined = build_spec(_config(base_config, refine="sam", sam=TINY_SAM))
    assert refined.source["refine"] == "sam" and refined.source["sam"]["iou_thresh"] == -100.0
    other = build_spec(_config(base_config, refine="sam", sam={**TINY_SAM, "iou_thresh": 0.5}))
    assert len({plain.fingerprint, refined.fingerprint, other.fingerprint}) == 3


def test_vfm_and_sam_weights_are_fingerprinted_by_content(base_config, tmp_path):
    hub = build_spec(_config(base_config, method="proxyclip", refine="sam"))
    assert hub.source["vfm_weights_content"] == {"hub": "timm/vit_base_patch8_224.dino"}
    assert hub.source["sam_weights_content"] == {"hub": "sam_vit_b_01ec64.pth"}
    weights = tmp_path / "dino.pt"
    weights.write_bytes(b"one")
    local = _config(base_config, method="proxyclip", proxyclip={"vfm": {"weights": str(weights)}})
    first = build_spec(local)
    weights.write_bytes(b"two")  # replaced in place: another model, another fingerprint
    second = build_spec(local)
    assert first.source["vfm_weights_content"]["size"] == 3 and first.fingerprint != second.fingerprint


def test_nested_keys_from_flags_and_one_line_errors(base_config, tmp_path):
    from jobs.cli import _parser
    from jobs.flags import overrides
    args = _parser().parse_args(["label", "--input", "x.tar", "--output", str(tmp_path), "--vocab", "a,b",
                                 "--method", "proxyclip", "--vfm-name", "dinov2_vitb14_reg", "--vfm-weights", "none",
                                 "--vfm-arch", '{"depth": 2}', "--vfm-mean", "0.5", "0.5", "0.5",
                                 "--proxyclip-beta", "1.5", "--refine", "sam", "--sam-iou-thresh", "0.7"])
    config = load_config(None, overrides(args))
    vfm = config.proxyclip.vfm
    assert (vfm.name, vfm.weights, vfm.arch, vfm.mean) == ("dinov2_vitb14_reg", "none", {"depth": 2}, (0.5,) * 3)
    assert config.proxyclip.beta == 1.5 and config.refine == "sam" and config.sam.iou_thresh == 0.7
    for keys, message in [
        ({"proxyclip": {"vfm": {"nme": "x"}}}, r"unknown key proxyclip.vfm.nme \(known: arch, mean, name, std, weights\)"),
        ({"proxyclip": {"vfm": {"name": "dino"}}}, "proxyclip.vfm.name: one of 'dino_vitb8'"),
        ({"refine": "crf"}, "refine: one of 'none', 'sam'"),
        ({"sam": {"model": "vit_s"}}, "sam.model: one of 'vit_b', 'vit_l', 'vit_h'"),
        ({"refine": "sam", "pamr": {"enabled": True}}, "pamr: PAMR is not applied with refine: sam"),
        ({"refine": "sam", "decode": "gpu"}, "decode: refine: sam needs each image's pixels on the CPU"),
        ({"method": "proxyclip", "proxyclip": {"vfm": {"weights": None}}}, "proxyclip.vfm.weights: method proxyclip"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(base_config, **keys)


@pytest.mark.parametrize("flags, message", [
    (["--method", "proxyclip", "--vfm-weights", "/nowhere/dino.pth"],
     "gemlabel: error: proxyclip.vfm.weights: VFM weights '/nowhere/dino.pth': no such file"),
    (["--method", "proxyclip"], "gemlabel: error: proxyclip.vfm.weights: could not fetch the VFM weights "
                                "vit_base_patch8_224.dino (dino_vitb8): no network access"),
    (["--refine", "sam", "--sam-weights", "/nowhere/sam.pth"],
     "gemlabel: error: sam.weights: SAM weights '/nowhere/sam.pth': no such file"),
    (["--refine", "sam", "--sam-model", "vit_h"], "gemlabel: error: sam.weights: SAM vit_h weights are not cached"),
])
def test_missing_vfm_or_sam_weights_fail_in_the_driver(base_config, tmp_path, capsys, monkeypatch, flags, message):
    """Offline without the weights: one line naming the key and what to pass, exit 2, before any
    worker starts (no Ray here: a worker would need one), nothing written."""
    import torch
    from tests.shards import write_shards
    from tests.test_errors import label_args, one_line_error
    import gem.sam
    import gem.vfm
    monkeypatch.setattr(gem.vfm, "_reachable", lambda host: False)  # offline, wherever the test runs
    monkeypatch.setattr(gem.sam, "_reachable", lambda host: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))  # no cached SAM checkpoint
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    config = {**base_config, "input": [str(p) for p in write_shards(tmp_path / "in", shards=1, per_shard=2)]}
    start = time.monotonic()
    assert main([*label_args(config), *flags]) == 2
    line = one_line_error(capsys)
    assert line.startswith(message), line
    assert time.monotonic() - start < 30 and not Path(config["output"]).exists()


PROXY_SAM = {"method": "proxyclip", "proxyclip": {"vfm": TINY_VFM}, "refine": "sam", "sam": TINY_SAM,
             "resize": "short_side", "short_side": 96, "max_long_side": 160, "slide": {"crop": 64, "stride": 32},
             "background": ["sky"], "thresholds": {"logit_scale": 40.0, "background_threshold": 0.2, "min_area": 1}}
SIZES = [(150, 100), (97, 131), (120, 120), (181, 77)]


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.usefixtures("ray_session")
def test_proxyclip_with_sam_refinement_job(base_config, tmp_path):
    """ProxyCLIP + SAM refinement through a real run: SAM's embeddings batched in the worker's
    model thread, the maps refined in post-processing; the written labels are the library's
    ``refined_label_map`` of each image (masks, areas, refined peaks as points), and differ from
    the unrefined ones."""
    import numpy as np
    import torch
    from gem import LabelingThresholds
    from gem.postprocess import class_regions
    from pipeline.driver.run import run_labeling
    from pipeline.store.rle import decode_mask
    from pipeline.store.schema import run_metadata_of
    from pipeline.worker.labeler import load_segmenter
    from pipeline.worker.refine import load_refiner
    from tests.outputs import all_rows, check_labels, read_tables
    from tests.shards import encode, photo, write_shard

    images = [photo(i, size) for i, size in enumerate(SIZES)]
    write_shard(tmp_path / "in" / "photos.tar",
                [{"__key__": f"img-{i}", "png": encode(image, "PNG")} for i, image in enumerate(images)])
    config = load_config(None, {**base_config, **PROXY_SAM, "input": [str(tmp_path / "in" / "*.tar")],
                                "batch_size": 3})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.images, summary.image_errors) == (1, len(SIZES), 0)
    metadata = run_metadata_of(next(iter(read_tables(config.output).values())).schema)
    assert metadata["method"] == "proxyclip" and metadata["refine"] == "sam"
    assert metadata["sam"]["arch"]["image_size"] == 256 and metadata["proxyclip"]["vfm"]["name"] == "dino_vitb8"

    spec = build_spec(config)
    segmenter, refiner = load_segmenter(spec, torch.device("cpu")), load_refiner(config, torch.device("cpu"))
    assert segmenter.vfm is not None and segmenter.vfm.model.embed_dim == 48
    vocabulary = segmenter.vocabulary(spec.class_names, spec.templates, config.background)
    thresholds = LabelingThresholds(logit_scale=40.0, background_threshold=0.2, min_area=1)
    changed = 0
    for row, image in zip(sorted(all_rows(config.output), key=lambda r: r["key"]), images):
        assert row["status"] == "ok", row["error"]
        check_labels(row)
        size = (image.height, image.width)
        (logits,) = segmenter.dense_logits([segmenter.model_input(image)], vocabulary)
        labels, stats, result = segmenter.refined_label_map(logits, size, vocabulary, refiner, np.asarray(image),
                                                            thresholds)
        assert bool(result.passed.any())  # iou_thresh -100: SAM's masks are taken
        regions = list(class_regions(labels, stats, 1))
        assert [(r.class_id, r.area, r.point) for r in regions] == [
            (label["class_id"], label["area"], (label["point_x"], label["point_y"])) for label in row["labels"]]
        for label, region in zip(row["labels"], regions):
            assert np.array_equal(decode_mask(label["rle_size"], label["rle_counts"]), region.mask)
        coarse, _ = segmenter.label_map(logits, size, vocabulary, thresholds)
        changed += int((coarse != labels).sum())
    assert changed > 0  # SAM's masks replaced coarse labels


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.usefixtures("ray_session")
def test_eval_and_calibrate_with_proxyclip_and_sam(base_config, tmp_path, capsys):
    """eval labels the ground truth with ProxyCLIP + SAM refinement (a real run) and scores it;
    calibrate sweeps ProxyCLIP's whole-image similarities, and refuses refine in one line."""
    import json
    import yaml
    from tests.test_errors import one_line_error
    from tests.test_quality import GT_FLAGS, VOCAB, write_class_map
    class_map = write_class_map(tmp_path)
    keys = {k: v for k, v in base_config.items() if k != "output"}
    proxy = {**keys, "vocab": VOCAB, "method": "proxyclip", "proxyclip": {"vfm": TINY_VFM}}
    refined = tmp_path / "refined.yaml"
    refined.write_text(yaml.safe_dump({**proxy, "refine": "sam", "sam": TINY_SAM}))
    assert main(["eval", *GT_FLAGS, "--config", str(refined), "--class-map", class_map,
                 "--report", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"]["scored"] == 6 and report["labelling_seconds"] > 0
    assert report["labels"] == str(tmp_path / "eval" / "labels")
    from pipeline.store.schema import run_metadata_of
    from tests.outputs import read_tables
    metadata = run_metadata_of(next(iter(read_tables(report["labels"]).values())).schema)
    assert metadata["refine"] == "sam" and metadata["method"] == "proxyclip"  # eval labelled with both
    capsys.readouterr()

    assert main(["calibrate", *GT_FLAGS, "--config", str(refined), "--class-map", class_map,
                 "--report", str(tmp_path / "refused"), "--no-progress"]) == 2
    assert "calibrate: cannot sweep refine: sam" in one_line_error(capsys)
    assert not (tmp_path / "refused").exists()

    plain = tmp_path / "proxy.yaml"
    plain.write_text(yaml.safe_dump(proxy))
    assert main(["calibrate", *GT_FLAGS, "--config", str(plain), "--class-map", class_map,
                 "--report", str(tmp_path / "calibration"), "--grid-logit-scale", "25,100",
                 "--grid-background-threshold", "0,0.3", "--grid-min-area", "1", "--no-progress"]) == 0
    record = json.loads((tmp_path / "calibration" / "calibration.json").read_text())
    assert len(record["template_sets"]["single"]["points"]) == 4


PRESETS = sorted((Path(__file__).parent.parent / "jobs" / "presets").glob("*.yaml"))
OVERRIDDEN = ("model", "pretrained", "gem.depth", "templates")  # the tiny CLIP's; templates: resolved


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.usefixtures("ray_session")
def test_every_preset_labels_end_to_end(base_config, tmp_path):
    """Every preset in jobs/presets runs as a real job (tar shard, local Ray, Parquet read back,
    RLE decoded), its own settings kept; only the models are tiny random ones (CLIP by name and
    checkpoint, the VFM's and SAM's sizes through their arch keys)."""
    import yaml
    from pipeline.driver.run import run_labeling
    from pipeline.store.schema import run_metadata_of
    from tests.outputs import all_rows, check_labels, read_tables
    from tests.shards import encode, photo, write_shard
    assert {p.stem for p in PRESETS} >= {"gem", "naclip", "sclip", "proxyclip", "proxyclip-sam"}
    shard = write_shard(tmp_path / "in" / "photos.tar", [{"__key__": f"img-{i}", "jpg": encode(photo(i), "JPEG")}
                                                         for i in (0, 3)])
    # Photos 1 and 2 are too flat for the random VFM: their mean patch cosine passes 1 / beta, so
    # proxy attention masks every entry and gives NaN, as the reference does.
    models = {k: base_config[k] for k in ("model", "pretrained", "model_config")}
    for preset in PRESETS:
        settings = yaml.safe_load(preset.read_text())
        keys = {**models, "input": [str(shard)], "output": str(tmp_path / preset.stem), "vocab": ["person", "dog"],
                "background": ["sky"], "batch_size": 2, "cpus_per_worker": 0.5, "decode_threads": 1,
                "gem.depth": 3,  # the tiny CLIP has 4 blocks
                "progress": False}
        if "proxyclip" in settings:
            keys["proxyclip.vfm.weights"], keys["proxyclip.vfm.arch"] = "none", TINY_VFM["arch"]
        if "sam" in settings:
            keys["sam.weights"], keys["sam.arch"] = "none", TINY_SAM["arch"]
        config = load_config(str(preset), keys)
        summary = run_labeling(config)
        assert (summary.shards_done, summary.images, summary.image_errors) == (1, 2, 0), preset.stem
        metadata = run_metadata_of(next(iter(read_tables(config.output).values())).schema)
        written, preset_leaves = _leaves(metadata), _leaves(settings)
        for key, value in preset_leaves.items():  # the preset's settings, as the labels record them
            if key.split(".")[0] in written and key not in OVERRIDDEN and not key.endswith((".weights", ".arch")):
                assert written.get(key) == value, (preset.stem, key)
        assert metadata.get("refine", "none") == settings.get("refine", "none")
        assert len(metadata["templates"]) == 80 and settings["templates"] == "imagenet80"
        rows = all_rows(config.output)
        assert len(rows) == 2 and all(row["status"] == "ok" for row in rows), preset.stem
        for row in rows:
            check_labels(row)
        assert sum(len(row["labels"]) for row in rows) > 0, preset.stem


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Nested settings as dotted keys (lists compared as lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out
