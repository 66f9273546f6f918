"""``gemlabel show`` and ``gemlabel export``: look at an output's labels, take them to training."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from jobs.flags import EXIT_CONFIG, EXIT_FAILED_SHARDS, EXIT_INTERRUPTED, EXIT_OK, add_storage_flags


def add_commands(commands: argparse._SubParsersAction) -> dict:
    """Add the subcommands to the ``gemlabel`` parser; returns command name -> handler."""
    from pipeline.export.common import FORMATS

    export = commands.add_parser("export", help="write an output's labels as COCO, semantic PNGs or YOLO-seg")
    export.add_argument("output", help="a gemlabel output prefix (local or s3://...)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--dest", help="export folder (default: OUTPUT/_exports/FORMAT, whose '_' keeps OUTPUT "
                                       "readable as one Parquet table)")
    export.add_argument("--instances", action="store_true", help="coco: one annotation per connected component")
    export.add_argument("--min-area", type=int, default=None,
                        help="instances smaller than this (pixels) are dropped (default: the labelling run's "
                             "thresholds.min_area)")
    export.add_argument("--images", action="store_true", help="copy the images out of the shards")
    export.add_argument("--image-format", default="jpg", help="jpg | png, for copied images")
    export.add_argument("--background-index", type=int, default=255,
                        help="semantic: value of background pixels (255 = ignore; 0 shifts classes to 1..C)")
    export.add_argument("--palette", action="store_true",
                        help="semantic: palette PNGs, coloured for viewing (default: 8-bit grey class indices, "
                             "which every loader reads as indices)")
    export.add_argument("--splits", help="NAME=GLOB,... on input shard URLs, e.g. 'train=*train-*,val=*val-*' "
                                         "(default: everything is train); a shard no glob matches is an error "
                                         "unless a catch-all is given, e.g. 'train=*train-*,rest=*'")
    export.add_argument("--cpus-per-task", type=float, default=0.5, help="Ray CPUs per shard task")
    export.add_argument("--ray-address", default=None,
                        help="export on this Ray cluster ('local' starts one); default: RAY_ADDRESS if set, "
                             "else local processes")
    add_storage_flags(export)
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
    add_storage_flags(show)
    return {"export": _export, "show": _show}


def _use_ray(address: Optional[str]) -> bool:
    """Ray when asked (--ray-address, RAY_ADDRESS) or already joined; else local processes."""
    import ray
    return bool(address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def _export(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.export.common import ExportError, ExportOptions, assign_splits, parse_splits
    from pipeline.export.runner import default_dest, run_export
    from pipeline.store.labelset import NotAnOutputError, open_labelset
    from jobs.flags import reader_location
    try:
        output = reader_location(args.output, args)
        labelset = open_labelset(output)
        dest = output.at(args.dest) if args.dest else default_dest(output, args.format)
        options = ExportOptions(args.format, dest, args.instances, args.min_area, args.images, args.image_format,
                                args.background_index, args.palette, parse_splits(args.splits), args.cpus_per_task)
        options.check(len(labelset.class_names))
        assign_splits(labelset, options.splits)
        use_ray = _use_ray(args.ray_address)
        if use_ray:
            from pipeline.driver.cluster import connect
            connect(args.ray_address, "--ray-address")
        summary = run_export(labelset, options, progress=args.progress, use_ray=use_ray)
    except (NotAnOutputError, ExportError, ConfigError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("gemlabel: export interrupted; the shards exported so far are kept, rerun the same command to "
              "finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # storage failing before any shard ran (botocore, aiohttp, OSError...)
        from jobs.flags import error_line
        print(f"gemlabel: error: export of {args.output}: {error_line(err)}", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    print(summary.text())
    return EXIT_FAILED_SHARDS if summary.shards_failed or summary.merge_failed else EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from pipeline.look.gallery import show_output
    from pipeline.store.destination import prepare_destination, remove_temps
    from pipeline.store.labelset import NotAnOutputError, open_labelset
    from pipeline.config import ConfigError
    from jobs.flags import error_line, reader_location
    try:
        output = reader_location(args.output, args)
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
        dest = output.at(args.dest)
        prepare_destination(dest)
        remove_temps(dest)
    except (NotAnOutputError, ValueError, ConfigError) as err:  # DestinationError is a ValueError
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    problems: dict[str, str] = {}
    try:
        urls = show_output(labelset, dest, args.pick, args.count, args.seed, args.class_name,
                           args.alpha, args.boxes, problems)
    except KeyboardInterrupt:
        print("gemlabel: show interrupted; the gallery is not complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # a full disk, an outage: what was written is whole, the gallery is not
        print(f"gemlabel: error: writing the gallery to {dest}: {error_line(err)}", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    for message in problems.values():
        print(f"gemlabel: error: images not shown: {message}", file=sys.stderr)
    print(f"gemlabel: gallery {urls['index']}, contact sheet {urls['contact_sheet']}")
    return EXIT_FAILED_SHARDS if problems else EXIT_OK
