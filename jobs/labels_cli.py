"""``gemlabel show`` and ``gemlabel export``: look at an output's labels, take them to training."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_CONFIG = 0, 1, 2


def _storage_options(endpoint: Optional[str]) -> dict:
    return {"s3": {"endpoint_url": endpoint}} if endpoint else {}


def add_commands(commands: argparse._SubParsersAction) -> dict:
    """Add the subcommands to the ``gemlabel`` parser; returns command name -> handler."""
    from pipeline.export.common import FORMATS

    export = commands.add_parser("export", help="write an output's labels as COCO, semantic PNGs or YOLO-seg")
    export.add_argument("output", help="a gemlabel output prefix (local or s3://...)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--dest", help="export folder (default: OUTPUT/exports/FORMAT)")
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
    return {"export": _export}


def _connect_ray(address: Optional[str]) -> None:
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, namespace="gemlabel", **({} if address else {"include_dashboard": False}))


def _export(args: argparse.Namespace) -> int:
    from pipeline.export.common import ExportError, ExportOptions, parse_splits
    from pipeline.export.runner import default_dest, run_export
    from pipeline.labelset import NotAnOutputError, open_labelset
    storage_options = _storage_options(args.s3_endpoint)
    try:
        labelset = open_labelset(args.output, storage_options)
        options = ExportOptions(args.format, args.dest or default_dest(args.output, args.format), args.instances,
                                args.min_area, args.images, args.image_format, args.background_index,
                                parse_splits(args.splits), args.cpus_per_task, storage_options)
        options.check(len(labelset.class_names))
    except (NotAnOutputError, ExportError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    _connect_ray(args.ray_address)
    summary = run_export(labelset, options, progress=args.progress)
    print(summary.text())
    return EXIT_FAILED_SHARDS if summary.shards_failed else EXIT_OK
