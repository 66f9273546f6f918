"""What the subcommands share: exit codes, one flag per config key (from the schema), the flags
given as config overrides, and URLs with the ``--s3-endpoint`` flag's storage options.

``jobs.cli`` assembles the parser from the subcommand modules; they and it import this module,
never each other's private helpers, so the command line imports in one direction.
"""
from __future__ import annotations

import argparse
import json
import typing
from typing import Optional

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def flag_options(key) -> dict:
    """argparse options of one config key, from the schema: type, help text with its default."""
    from pipeline.config import default_text
    help_text = f"{key.description} (default: {default_text(key)})".replace("%", "%%")
    if key.kind == "bool":
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


def vocab_item(text: str) -> str | list[str]:
    """One class of --vocab: a name, or synonyms joined by '|' (the first is the label)."""
    names = [name.strip() for name in text.split("|")]
    return names if len(names) > 1 else names[0]


def overrides(args: argparse.Namespace) -> dict:
    """The flags given, as config keys; the flag's text parsed as its key's schema says."""
    from pipeline.config import ConfigError, config_keys
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
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key.key}: {key.flag} expects JSON, e.g. "
                                  f"'{{\"s3\": {{\"endpoint_url\": \"http://127.0.0.1:9000\"}}}}'") from None
        overrides[key.key] = value
    if args.s3_endpoint:
        options = dict(overrides.get("storage_options") or {})
        options["s3"] = {**options.get("s3", {}), "endpoint_url": args.s3_endpoint}
        overrides["storage_options"] = options
    return overrides


def error_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
