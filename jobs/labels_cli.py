"""``gemlabel show`` and ``gemlabel export``: look at an output's labels, take them to training."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from jobs.flags import EXIT_CONFIG, EXIT_FAILED_SHARDS, EXIT_OK


def add_commands(commands: argparse._SubParsersAction) -> dict:
    """Add the subcommands to the ``gemlabel`` parser; returns command name -> handler."""
    from pipeline.export.common import FORMATS

    export = commands.add_parser("export", help="write an output's labels as COCO, semantic PNGs or YOLO-seg")
    export.add_argument("output", help="a gemlabel output prefix (local or s3://...)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--dest", help="export folder (default: OUTPUT/_exports/FORMAT, whose '_' keeps OUTPUT "
                                       "readable as one Parquet table)")
    export.add_argument("--instances", action="store_true", help="coco: one annotation per connected component")
    export.add_argument("--min-area", type=int, default=1, help="instances smaller than this (pixels) are dropped")
    export.add_argument("--images", action="store_true", help="copy the images out of the shards")
    export.add_argument("--image-format", default="jpg", help="jpg | png, for copied images")
    export.add_argument("--background-index", type=int, default=255,
                        help="semantic: value of background pixels (255 = ignore; 0 shifts classes to 1..C)")
    export.add_argument("--splits", help="NAME=GLOB,... on input shard URLs, e.g. 'train=*train-*,val=*val-*' "
                                         "(default: everything is train)")
    export.add_argument("--cpus-per-task", type=float, default=0.5, help="Ray CPUs per shard task")
    export.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a local cluster")
    export.add_argument("--s3-endpoint", default=None)
    export.add_argument("--no-progress", dest="progress", action="store_false")

    from pipeline.look.show import PICKS
    show = commands.add_parser("show", help="draw labels over their images: PNGs, index.html gallery, contact sheet")
    show.add_argument("output", help="a gemlabel output prefix (local or s3://...)")
    show.add_argument("--dest", default="gemlabel-show", help="where the pictures go (default: ./gemlabel-show)")
    show.add_argument("--pick", nargs="+", default=["random", "errors"], choices=PICKS,
                      help="random, class (needs --class), lowest / highest score, errors; several allowed")
    show.add_argument("--class", dest="class_name", help="only images with this class (and its score)")
    show.add_argument("--count", type=int, default=12, help="pictures per pick")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--alpha", type=float, default=0.5, help="mask opacity, 0..1")
    show.add_argument("--boxes", action="store_true", help="draw boxes too")
    show.add_argument("--s3-endpoint", default=None)
    return {"export": _export, "show": _show}


def _connect_ray(address: Optional[str]) -> None:
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, namespace="gemlabel", **({} if address else {"include_dashboard": False}))


def _export(args: argparse.Namespace) -> int:
    from pipeline.export.common import ExportError, ExportOptions, parse_splits
    from pipeline.export.runner import default_dest, run_export
    from pipeline.store.labelset import NotAnOutputError, open_labelset
    from jobs.flags import location
    output = location(args.output, args.s3_endpoint)
    try:
        labelset = open_labelset(output)
        dest = output.at(args.dest) if args.dest else default_dest(output, args.format)
        options = ExportOptions(args.format, dest, args.instances, args.min_area, args.images, args.image_format,
                                args.background_index, parse_splits(args.splits), args.cpus_per_task)
        options.check(len(labelset.class_names))
    except (NotAnOutputError, ExportError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    _connect_ray(args.ray_address)
    summary = run_export(labelset, options, progress=args.progress)
    print(summary.text())
    return EXIT_FAILED_SHARDS if summary.shards_failed else EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from pipeline.look.gallery import show_output
    from pipeline.store.labelset import NotAnOutputError, open_labelset
    from jobs.flags import location
    output = location(args.output, args.s3_endpoint)
    try:
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha: must be in [0, 1], got {args.alpha}")
        if args.count < 1:
            raise ValueError(f"--count: must be at least 1, got {args.count}")
        labelset = open_labelset(output)
        if args.class_name is not None and args.class_name not in labelset.class_names:
            raise ValueError(f"--class: {args.class_name!r} is not in the vocabulary "
                             f"({', '.join(labelset.class_names)})")
        if "class" in args.pick and args.class_name is None:
            raise ValueError("--pick class: give the class with --class NAME")
    except (NotAnOutputError, ValueError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    urls = show_output(labelset, output.at(args.dest), args.pick, args.count, args.seed, args.class_name,
                       args.alpha, args.boxes)
    print(f"gemlabel: gallery {urls['index']}, contact sheet {urls['contact_sheet']}")
    return EXIT_OK
