"""What the subcommands share: exit codes, one flag per config key (from the schema), the flags
given as config overrides, and URLs with the ``--s3-endpoint`` flag's storage options.

``jobs.cli`` assembles the parser from the subcommand modules; they and it import this module,
never each other's private helpers, so the command line imports in one direction.
"""
from __future__ import annotations

import argparse
import typing
from typing import Optional

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def flag_options(key) -> dict:
    """argparse options of one config key, from the schema: type, help text with its default."""
    from pipeline.config import default_text
    help_text = f"{key.description} (default: {default_text(key)})".replace("%", "%%")
    if key.kind == "bool":
        if key.default:  # a --no-X flag: say what it turns off, not "(default: true)"
            help_text = f"turns off what is on by default: {key.description}".replace("%", "%%")
        return dict(action="store_false" if key.default else "store_true", help=help_text)
    options: dict = dict(help=help_text, metavar=key.key.rpartition(".")[2].upper())
    if key.kind == "choice":
        options.update(choices=list(typing.get_args(key.annotation)), metavar=None)
    elif key.kind in ("int", "float"):
        options["type"] = {"int": int, "float": float}[key.kind]
    elif key.kind in ("list-int", "list-float"):
        options.update(type={"list-int": int, "list-float": float}[key.kind], nargs="+")
    elif key.kind == "list-str" and key.cli is None:
        options["nargs"] = "+"
    return options


def add_config_flags(parser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config key (a parser or an argument group), except the keys in ``skip``."""
    from pipeline.config import config_keys
    for key in config_keys():
        if key.flag and key.key not in skip:
            parser.add_argument(key.flag, dest=key.key, default=None, **flag_options(key))


def storage_options(endpoint: Optional[str]) -> dict:
    return {"s3": {"endpoint_url": endpoint}} if endpoint else {}


def location(url: str, endpoint: Optional[str]):
    """A URL given on the command line, with the --s3-endpoint flag's storage options."""
    from pipeline.io.storage import Location
    return Location(url, storage_options(endpoint))


def add_storage_flags(parser) -> None:
    """How a command that reads an output (export, show, report) reaches it, as ``label`` does:
    a config file's ``storage_options``, ``--storage-options`` JSON over it, ``--s3-endpoint`` last."""
    parser.add_argument("--config", help="a label YAML config: its storage_options are used (other keys ignored)")
    parser.add_argument("--storage-options", dest="storage_options", default=None, metavar="JSON",
                        help="fsspec options per protocol, as for label, e.g. "
                             "'{\"s3\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, R2, ...)")


def reader_options(args: argparse.Namespace) -> dict:
    """The storage options of ``add_storage_flags``' flags; ConfigError when malformed."""
    from pipeline.config import load_storage_options
    given = None
    if args.storage_options is not None:
        given = mapping_text("storage_options", "--storage-options", args.storage_options)
    options = load_storage_options(args.config, given)
    if args.s3_endpoint:
        options = {**options, "s3": {**options.get("s3", {}), "endpoint_url": args.s3_endpoint}}
    return options


def reader_location(url: str, args: argparse.Namespace):
    """An output URL given to export, show or report, with its storage options."""
    from pipeline.io.storage import Location
    return Location(url, reader_options(args))


def vocab_item(text: str) -> str | list[str]:
    """One class of --vocab: a name, or synonyms joined by '|' (the first is the label)."""
    names = [name.strip() for name in text.split("|")]
    return names if len(names) > 1 else names[0]


def overrides(args: argparse.Namespace) -> dict:
    """The flags given, as config keys; the flag's text parsed as its key's schema says."""
    from pipeline.config import config_keys
    overrides = {}
    for key in config_keys():
        value = getattr(args, key.key, None) if key.flag else None
        if value is None:
            continue
        if key.cli == "comma":
            value = [name.strip() for name in value.split(",")]
        elif key.cli == "vocab":
            value = [vocab_item(item) for item in value.split(",")]
        elif key.cli == "json":
            value = mapping_text(key.key, key.flag, value)
        overrides[key.key] = value
    if args.s3_endpoint:
        options = dict(overrides.get("storage_options") or {})
        options["s3"] = {**options.get("s3", {}), "endpoint_url": args.s3_endpoint}
        overrides["storage_options"] = options
    return overrides


def config_error_text(err: BaseException) -> str:
    """A ConfigError's message, plus the flag that sets the key it names (the library's messages
    name config keys, which a command-line user sets with flags)."""
    from pipeline.config import config_keys
    key = getattr(err, "key", "")
    flag = next((k.flag for k in config_keys() if k.key == key and k.flag), None) if key else None
    return f"{err}; on the command line, {key} is {flag}" if flag else str(err)


def mapping_text(key: str, flag: str, text: str):
    """A flag's mapping, in JSON or YAML flow syntax (``{s3: {endpoint_url: http://...}}``, as the
    docs write it; JSON is YAML too)."""
    import yaml
    from pipeline.config import ConfigError
    try:
        return yaml.safe_load(text)  # not a mapping: the config's check says so
    except yaml.YAMLError:
        raise ConfigError(f"{key}: {flag} expects a mapping in JSON or YAML flow syntax, e.g. "
                          "'{s3: {endpoint_url: http://127.0.0.1:9000}}'") from None


def error_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
