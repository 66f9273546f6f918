"""The ``gemlabel`` command: ``label`` runs a labeling job, ``report`` summarises an output.

Exit codes: 0 all shards labelled; 1 some shards failed (listed in the summary); 2 bad
configuration (one line on stderr saying what to fix).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_CONFIG = 0, 1, 2

# flag -> config key (dotted keys go into sections)
LABEL_FLAGS = {
    "--input": ("input", dict(nargs="+", help="shard URLs, globs, brace patterns or .txt shard lists")),
    "--output": ("output", dict(help="output prefix: a local path or s3://, gs:// URL")),
    "--vocab": ("vocab", dict(help='comma-separated class names, e.g. "cat,dog,traffic light"; '
                                   'synonyms joined by |, e.g. "person|man|woman,dog"')),
    "--vocab-file": ("vocab_file", dict(help="a file with one class per line (commas between synonyms)")),
    "--background": ("background", dict(help='comma-separated background names, e.g. "sky,wall,tree"')),
    "--templates": ("templates", dict(help="single | imagenet80 | a file of templates | one template with {}")),
    "--model": ("model", dict(help="open_clip model name, e.g. ViT-B-16")),
    "--pretrained": ("pretrained", dict(help="open_clip tag (openai, ...) or a local checkpoint path")),
    "--model-config": ("model_config", dict(help="extra open_clip model config JSON (file or folder)")),
    "--depth": ("gem.depth", dict(type=int)),
    "--iters": ("gem.iters", dict(type=int)),
    "--inv-temperature": ("gem.inv_temperature", dict(type=float, help="fixed; default adaptive")),
    "--logit-scale": ("thresholds.logit_scale", dict(type=float)),
    "--background-threshold": ("thresholds.background_threshold", dict(type=float)),
    "--min-area": ("thresholds.min_area", dict(type=int)),
    "--input-size": ("input_size", dict(type=int, nargs="+", help="model input: SIZE or HEIGHT WIDTH")),
    "--method": ("method", dict(choices=["gem", "naclip", "kk", "sclip", "vanilla"])),
    "--resize": ("resize", dict(choices=["square", "short_side"])),
    "--short-side": ("short_side", dict(type=int)),
    "--slide-crop": ("slide.crop", dict(type=int, help="sliding-window side (model-input pixels)")),
    "--slide-stride": ("slide.stride", dict(type=int)),
    "--pamr-steps": ("pamr.steps", dict(type=int)),
    "--precision": ("precision", dict(choices=["auto", "fp32", "bf16", "fp16"])),
    "--batch-size": ("batch_size", dict(type=int)),
    "--num-workers": ("num_workers", dict(type=int)),
    "--cpus-per-worker": ("cpus_per_worker", dict(type=float)),
    "--gpus-per-worker": ("gpus_per_worker", dict(type=float)),
    "--decode-threads": ("decode_threads", dict(type=int)),
    "--max-shard-retries": ("max_shard_retries", dict(type=int)),
    "--ray-address": ("ray_address", dict(help="Ray cluster address; default: RAY_ADDRESS or a local cluster")),
}
SWITCHES = {"--overwrite": "overwrite", "--retry-failed": "retry_failed", "--pamr": "pamr.enabled"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemlabel", description="Open-vocabulary pseudo-labeling with GEM.")
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser("label", help="label shards; reruns skip shards already done")
    label.add_argument("--config", help="YAML config; flags override its keys")
    for flag, (key, options) in LABEL_FLAGS.items():
        label.add_argument(flag, dest=key, default=None, **options)
    for flag, key in SWITCHES.items():
        label.add_argument(flag, dest=key, action="store_true", default=None)
    label.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, R2, ...)")
    label.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                       help="one line per shard instead of a progress bar")
    pack = commands.add_parser("pack", help="pack a folder of images into webdataset shards")
    pack.add_argument("folder")
    pack.add_argument("output_prefix", help="e.g. data/shards/train writes data/shards/train-000000.tar, ...")
    pack.add_argument("--per-shard", type=int, default=1000)
    pack.add_argument("--pattern", default="*", help="glob on file names, e.g. '*_image.png'")
    report = commands.add_parser("report", help="summarise an output from its markers")
    report.add_argument("output")
    report.add_argument("--s3-endpoint", default=None)
    report.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _storage_options(endpoint: Optional[str]) -> dict:
    return {"s3": {"endpoint_url": endpoint}} if endpoint else {}


def _overrides(args: argparse.Namespace) -> dict:
    keys = [key for key, _ in LABEL_FLAGS.values()] + list(SWITCHES.values()) + ["progress"]
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if "vocab" in overrides:
        overrides["vocab"] = [item.split("|") if "|" in item else item for item in overrides["vocab"].split(",")]
    if "background" in overrides:
        overrides["background"] = [name for name in overrides["background"].split(",") if name.strip()]
    if args.s3_endpoint:
        overrides["storage_options"] = _storage_options(args.s3_endpoint)
    return overrides


def _label(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.runner import WorkersLostError, WorkerStartError, run_labeling
    try:
        config = load_config(args.config, _overrides(args))
        summary = run_labeling(config)
    except (ConfigError, WorkerStartError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except WorkersLostError as err:  # the shards left are not done; a rerun picks them up
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_FAILED_SHARDS if summary.shards_failed else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from pipeline.report import format_report, summarize_output
    try:
        report = summarize_output(args.output, _storage_options(args.s3_endpoint))
    except FileNotFoundError as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return EXIT_FAILED_SHARDS if report["shards_failed"] else EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from pipeline.pack import pack_images
    try:
        shards = pack_images(args.folder, args.output_prefix, args.per_shard, args.pattern)
    except ValueError as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"gemlabel: wrote {len(shards)} shard(s): {shards[0]} ... {shards[-1]}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    return {"label": _label, "report": _report, "pack": _pack}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
