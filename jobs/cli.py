"""The ``gemlabel`` command: ``label`` runs a labeling job, ``report`` summarises an output.

Exit codes: 0 all shards labelled; 1 some shards failed (listed in the summary) or storage failed
mid-run; 2 bad configuration (one line on stderr saying what to fix); 130 interrupted (Ctrl-C: one
line saying what was finished; rerunning the same command goes on).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import gemlabel
from jobs.flags import (EXIT_CONFIG, EXIT_FAILED_SHARDS, EXIT_INTERRUPTED, EXIT_OK, add_config_flags,
                         add_storage_flags, config_error_text, error_line, location, overrides, reader_location)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemlabel", description="Open-vocabulary pseudo-labeling with GEM.")
    parser.add_argument("--version", action="version", version=f"gemlabel {gemlabel.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser("label", help="label shards; reruns skip shards already done")
    label.add_argument("--config", help="YAML config; flags override its keys")
    add_config_flags(label)
    label.add_argument("--s3-endpoint", default=None,
                       help="S3-compatible endpoint URL (MinIO, R2, ...): sets storage_options.s3.endpoint_url")
    pack = commands.add_parser("pack", help="pack a folder of images into webdataset shards")
    pack.add_argument("folder")
    pack.add_argument("output_prefix", help="e.g. data/shards/train writes data/shards/train-000000.tar, ...")
    pack.add_argument("--per-shard", type=int, default=1000, metavar="N",
                      help="images per shard (default: 1000); a rerun packs only new or changed files")
    pack.add_argument("--pattern", default="*", help="glob on file names, e.g. '*_image.png'")
    pack.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL for an s3:// output prefix")
    report = commands.add_parser("report", help="summarise an output from its markers")
    report.add_argument("output", help="an output prefix gemlabel label wrote (local path, s3://, gs://, ...)")
    add_storage_flags(report)
    report.add_argument("--input", nargs="+", default=None,
                        help="the run's input (shard URLs, globs, .txt lists): also count the shards still pending")
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument("--no-classes", action="store_true",
                        help="skip the per-class table (it reads the class, score and area columns of every "
                             "Parquet file; the totals come from the markers alone)")
    report.add_argument("--plots", metavar="DIR", default=None,
                        help="write classes.png (images per class) and scores.png (score histograms per class) "
                             "to DIR (needs matplotlib: gemlabel[quality])")
    from jobs import labels_cli, quality_cli
    quality_cli.add_commands(commands)  # eval, calibrate
    parser.set_defaults(handlers={**labels_cli.add_commands(commands),  # show, export
                                  "eval": quality_cli.handle, "calibrate": quality_cli.handle})
    return parser


def _label(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.driver.records import RunInterrupted, RunRecordError
    from pipeline.driver.pool import WorkersLostError, WorkerStartError
    from pipeline.driver.run import run_labeling
    from pipeline.io.redact import redact_text
    try:
        config = load_config(args.config, overrides(args))
        summary = run_labeling(config)
    except (ConfigError, WorkerStartError) as err:
        print(f"gemlabel: error: {redact_text(config_error_text(err))}", file=sys.stderr)
        return EXIT_CONFIG
    except (WorkersLostError, RunRecordError) as err:  # the shards left are not done; a rerun picks them up
        print(f"gemlabel: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    except RunInterrupted as err:
        print(f"gemlabel: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("gemlabel: interrupted before labelling started; rerun the same command", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED_SHARDS if summary.shards_failed else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.store.report import InputPatternError, format_report, summarize_output
    if args.plots is not None:
        if args.no_classes:
            print("gemlabel: error: --plots draws the per-class counts: drop --no-classes", file=sys.stderr)
            return EXIT_CONFIG
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("gemlabel: error: --plots needs matplotlib: pip install 'gemlabel[quality]'", file=sys.stderr)
            return EXIT_CONFIG
    counts: list = []
    try:
        report = summarize_output(reader_location(args.output, args), args.input,
                                  per_class=not args.no_classes, counts=counts)
    except (FileNotFoundError, ConfigError, InputPatternError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:  # storage back ends raise their own kinds (botocore, aiohttp, ...)
        hint = ("; for MinIO, R2 or Ceph pass --s3-endpoint URL, for AWS set its credentials"
                if args.output.startswith("s3") and not (args.s3_endpoint or args.storage_options or args.config)
                else "")
        print(f"gemlabel: error: cannot read {args.output}: {error_line(err)}{hint}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plots is not None:
        from pipeline.quality.class_plots import write_class_plots
        names = [row["name"] for row in report["per_class"]]
        report["plots"] = write_class_plots(counts[0], names, reader_location(args.plots, args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return EXIT_FAILED_SHARDS if report["shards_failed"] or report["shards_missing"] else EXIT_OK


def _pack(args: argparse.Namespace) -> int:
    from pipeline.io.pack import pack_images
    try:
        result = pack_images(args.folder, location(args.output_prefix, args.s3_endpoint), args.per_shard,
                             args.pattern)
    except (ValueError, OSError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(pack_summary(result, args.output_prefix))
    return EXIT_OK


def pack_summary(result, prefix: str) -> str:
    """One line: the shards written (each path once) and the files skipped as already packed."""
    shards = result.shards
    where = "" if not shards else f": {shards[0]}" if len(shards) == 1 else f": {shards[0]} ... {shards[-1]}"
    skipped = (f"; skipped {result.skipped} file(s) already packed under {prefix} (same path and content)"
               if result.skipped else "")
    return f"gemlabel: wrote {len(shards)} shard(s) with {result.files} file(s){where}{skipped}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged (not the stream at setup time,
    which a test harness or an embedding program may have closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        from pipeline.io.redact import redact_text
        return redact_text(super().format(record))


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        handlers=[_StderrHandler()])
    args = _parser().parse_args(argv)
    handlers = {"label": _label, "report": _report, "pack": _pack, **args.handlers}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
