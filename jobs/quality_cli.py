"""``gemlabel eval`` and ``gemlabel calibrate``: is my labelling good, and which thresholds are best?

Both read ground truth in one of three layouts (see pipeline.quality.groundtruth) and take the labelling
configuration ``label`` takes (``--config`` and the same flags), so what they measure is what a
``label`` run with that configuration produces. Exit codes: 0 done, 1 labelling failed, 2 bad
input (one line saying what to fix; nothing written).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from jobs.flags import EXIT_CONFIG as EXIT_INPUT, EXIT_FAILED_SHARDS as EXIT_FAILED, EXIT_OK


def _add_ground_truth_flags(parser: argparse.ArgumentParser) -> None:
    gt = parser.add_argument_group("ground truth (one layout)")
    gt.add_argument("--gt-images", help="folder of images (folder layout), or the images root of --coco")
    gt.add_argument("--gt-masks", help="folder of index/palette PNG masks (default: --gt-images)")
    gt.add_argument("--classes", help="class list file, one name a line, line i = mask value i (255 = ignore)")
    gt.add_argument("--image-suffix", default="", help="stripped from image stems to find masks, e.g. _image")
    gt.add_argument("--mask-suffix", default="", help="added to the stem for the mask file, e.g. _target")
    gt.add_argument("--coco", help="COCO instances or panoptic JSON (images under --gt-images)")
    gt.add_argument("--panoptic-masks", help="folder of the panoptic PNGs (default: the JSON's name without .json)")
    gt.add_argument("--gt-shards", nargs="+", help="webdataset shards with key.jpg + key.seg.png (and --classes)")
    mapping = parser.add_argument_group("classes")
    mapping.add_argument("--class-map", help="YAML: ground-truth class -> vocabulary name(s); default: equal names")
    mapping.add_argument("--unmapped", choices=["ignore", "background"], default="ignore",
                         help="ground-truth classes no vocabulary entry maps to (default: ignore)")
    mapping.add_argument("--background-class", default="background",
                         help="the class list's background class (default: 'background' if listed; 'none': no such class)")


def _add_label_flags(parser: argparse.ArgumentParser) -> None:
    from jobs.flags import add_config_flags
    group = parser.add_argument_group("labelling configuration (as for gemlabel label)")
    group.add_argument("--config", help="YAML config; flags override its keys")
    add_config_flags(group, skip=("input",))  # the input comes from the ground truth
    parser.set_defaults(input=None)
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, R2, ...)")


def add_commands(commands) -> None:
    """Register ``eval`` and ``calibrate`` on the gemlabel subparsers."""
    evaluate = commands.add_parser("eval", help="score labels against ground truth (labelling first if needed)")
    _add_ground_truth_flags(evaluate)
    evaluate.add_argument("--labels", help="score this existing gemlabel output instead of labelling")
    evaluate.add_argument("--report", required=True, help="folder for report.json, report.md and the plots")
    _add_label_flags(evaluate)
    calibrate = commands.add_parser("calibrate", help="sweep post-processing settings on ground truth; "
                                                      "write the best as a config fragment")
    _add_ground_truth_flags(calibrate)
    calibrate.add_argument("--report", required=True, help="folder for best.yaml, calibration.json/.png")
    calibrate.add_argument("--grid-logit-scale", help="comma-separated values, e.g. 25,50,100")
    calibrate.add_argument("--grid-background-threshold", help="comma-separated values in [0, 1]")
    calibrate.add_argument("--grid-min-area", help="comma-separated pixel counts")
    calibrate.add_argument("--compare-templates", help="also score these template sets (comma-separated: single, "
                                                       "imagenet80, a file); one text encoding each, no new image pass")
    _add_label_flags(calibrate)


def _ground_truth(args: argparse.Namespace, storage_options: dict):
    from pipeline.quality.groundtruth import GroundTruthError, coco_ground_truth, folder_ground_truth, shard_ground_truth
    from pipeline.io.storage import Location
    layouts = [name for name, given in (("--coco", args.coco), ("--gt-shards", args.gt_shards),
                                        ("--gt-masks/--classes folder", args.gt_images and not args.coco))
               if given]
    if len(layouts) != 1:
        raise GroundTruthError("give one ground truth: --gt-images DIR --classes FILE [--gt-masks DIR], "
                               "or --coco FILE --gt-images DIR, or --gt-shards URL... --classes FILE")
    if args.coco:
        if not args.gt_images:
            raise GroundTruthError("--coco needs --gt-images (the folder its file_name entries are under)")
        return coco_ground_truth(args.coco, args.gt_images, args.panoptic_masks)
    if not args.classes:
        raise GroundTruthError("--classes: give the class list file (line i = mask value i)")
    if args.gt_shards:
        return shard_ground_truth([Location(url, storage_options) for url in args.gt_shards],
                                  Location(args.classes, storage_options))
    return folder_ground_truth(args.gt_images, args.gt_masks, args.classes, args.image_suffix, args.mask_suffix)


def _mapping(args: argparse.Namespace, class_names: list[str], vocab: list[str]):
    from pipeline.quality.classmap import build_mapping, read_mapping_file
    mapping = read_mapping_file(args.class_map) if args.class_map else None
    background = None if args.background_class.lower() == "none" else args.background_class
    return build_mapping(class_names, vocab, mapping, args.unmapped, background)


def _label_config(args: argparse.Namespace, output: str):
    """The label command's configuration, its input filled in later from the ground truth."""
    from jobs.flags import overrides
    from pipeline.config import load_config
    given = overrides(args)
    given.setdefault("output", output)
    given["input"] = ["(ground truth)"]
    return load_config(args.config, given)


def _grid_values(text: Optional[str], kind: type, name: str) -> Optional[list]:
    from pipeline.quality.groundtruth import GroundTruthError
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GroundTruthError(f"{name}: expected comma-separated {'integers' if kind is int else 'numbers'}, "
                               f"got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise GroundTruthError(f"{name}: values must be finite numbers, got {bad[0]}")
    return values


def _check_report_folder(report: str) -> None:
    """--report must be a folder that is or can be made: checked before any work (nothing made yet)."""
    from pipeline.quality.groundtruth import GroundTruthError
    path = Path(report)
    if path.exists() and not path.is_dir():
        raise GroundTruthError(f"--report {report}: is a file, not a folder")
    ancestor = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise GroundTruthError(f"--report {report}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise GroundTruthError(f"--report {report}: cannot write in {ancestor}")


def _template_sets(configured, compare: Optional[str]) -> dict:
    """Set name -> its templates value: the config's first, then --compare-templates' others."""
    from gem.templates import resolve_templates
    from pipeline.config import ConfigError
    sets = {configured if isinstance(configured, str) else "config": configured}
    for name in (n.strip() for n in (compare or "").split(",")):
        if name and name not in sets:
            try:
                resolve_templates(name)
            except ValueError as err:
                raise ConfigError(f"--compare-templates: {err}") from None
            sets[name] = name
    return sets


def _run(handler, args: argparse.Namespace) -> int:
    from jobs.flags import config_error_text
    from pipeline.config import ConfigError
    from pipeline.quality.groundtruth import GroundTruthError
    from pipeline.driver.pool import WorkersLostError, WorkerStartError
    from jobs.flags import EXIT_INTERRUPTED, error_line
    try:
        _check_report_folder(args.report)
        return handler(args)
    except (ConfigError, GroundTruthError, WorkerStartError) as err:
        print(f"gemlabel: error: {config_error_text(err)}", file=sys.stderr)
        return EXIT_INPUT
    except (WorkersLostError, RuntimeError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # storage failing mid-way (a full disk, an outage)
        print(f"gemlabel: error: {args.command}: {error_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"gemlabel: {args.command} interrupted; rerun the same command", file=sys.stderr)
        return EXIT_INTERRUPTED


def _eval(args: argparse.Namespace) -> int:
    from jobs.flags import storage_options
    from pipeline.quality.evaluate import label_ground_truth, read_output_rows, score_rows
    from pipeline.config import class_labels
    from pipeline.quality.report import write_report
    from pipeline.driver.plan import build_spec, check_model
    from pipeline.io.storage import Location
    storage_options = storage_options(args.s3_endpoint)
    ground_truth = _ground_truth(args, storage_options)
    progress = args.progress is not False
    seconds = None
    if args.labels:
        output = args.labels
    else:  # everything is checked before any labelling starts
        config = _label_config(args, str(Path(args.report) / "labels"))
        _mapping(args, ground_truth.class_names, class_labels(build_spec(config).class_names))
        check_model(config)
        _check_ray_address(config.ray_address)
        output, seconds = label_ground_truth(ground_truth, config, args.report)
        storage_options = config.storage_options
    vocab, rows = read_output_rows(Location(output, storage_options))
    mapping = _mapping(args, ground_truth.class_names, vocab)
    start = time.perf_counter()
    result = score_rows(ground_truth, rows, mapping, progress)
    record = write_report(result, args.report, {
        "labels": output, "labelling_seconds": None if seconds is None else round(seconds, 3),
        "scoring_seconds": round(time.perf_counter() - start, 3)})
    summary = record["summary"]
    print(f"gemlabel eval: {result.images_scored} images, mIoU {summary['mIoU']}, aAcc {summary['aAcc']}, "
          f"fwIoU {summary['fwIoU']}, point precision {summary['point_precision']} -> {args.report}/report.md")
    return EXIT_OK


def _check_ray_address(address: Optional[str]) -> None:
    """The cluster eval labels on must answer before the ground truth is packed into shards."""
    import os
    from pipeline.driver.cluster import check_reachable
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_reachable(address)


def _check_calibratable(config) -> None:
    """calibrate caches whole-image, one-name-per-class similarities at ``input_size``; the keys
    that change that path (issue 11) are refused rather than silently ignored."""
    from pipeline.config import ConfigError
    if config.refine != "none":
        raise ConfigError(f"calibrate: cannot sweep refine: {config.refine} (its cache holds the model's similarities, "
                          "not SAM-refined maps); calibrate with refine: none, then eval the refined labels")
    unsupported = config.non_default(("background", "resize", "short_side", "max_long_side", "slide", "pamr"))
    if any(not isinstance(entry, str) for entry in config.vocab):
        unsupported.append("vocab synonyms")
    if unsupported:
        raise ConfigError(f"calibrate: not supported with {', '.join(unsupported)} (whole-image, one name per "
                          "class only); use eval to score such settings")


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from pipeline.quality.calibrate import Grid, compute_similarities, sweep, write_calibration
    from pipeline.config import class_labels
    from pipeline.driver.plan import build_spec, check_model
    from pipeline.config.sizing import local_sizing
    from pipeline.worker.labeler import load_segmenter
    config = _label_config(args, args.report)
    _check_calibratable(config)
    ground_truth = _ground_truth(args, config.storage_options)
    spec = build_spec(config)
    mapping = _mapping(args, ground_truth.class_names, class_labels(spec.class_names))
    values = {"logit_scale": _grid_values(args.grid_logit_scale, float, "--grid-logit-scale"),
              "background_threshold": _grid_values(args.grid_background_threshold, float,
                                                   "--grid-background-threshold"),
              "min_area": _grid_values(args.grid_min_area, int, "--grid-min-area")}
    grid = Grid(**{k: v for k, v in values.items() if v is not None})
    specs = _template_sets(config.templates, args.compare_templates)
    check_model(config)
    device = torch.device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")
    batch_size = local_sizing(config, device.type == "cuda").batch_size  # the config's, or this machine's
    segmenter = load_segmenter(spec, device, batch_size)
    vocabularies = {name: segmenter.vocabulary(spec.class_names, templates) for name, templates in specs.items()}
    progress = args.progress is not False
    start = time.perf_counter()
    cached = compute_similarities(ground_truth, segmenter, vocabularies, mapping, tuple(config.input_size),
                                  batch_size, progress, config.jpeg_draft)
    model_seconds = time.perf_counter() - start
    calibrations = [sweep(cached, mapping, grid, model_seconds, progress, name) for name in vocabularies]
    record = write_calibration(calibrations, args.report, {"mapping": mapping.as_dict()}, specs, config.to_dict())
    best = record["best"]
    print(f"gemlabel calibrate: best of {grid.size * len(calibrations)} settings on {len(cached)} images: "
          f"logit_scale {best['logit_scale']}, background_threshold {best['background_threshold']}, "
          f"min_area {best['min_area']}, templates {best['templates']} (mIoU {100 * best['mIoU']:.2f}) "
          f"-> {args.report}/best.yaml")  # results on stdout, progress on stderr, as label does
    return EXIT_OK


def handle(args: argparse.Namespace) -> int:
    return _run({"eval": _eval, "calibrate": _calibrate}[args.command], args)
