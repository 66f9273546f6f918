"""Reading a small text file that a user names (a config, a class list, a class map, COCO JSON):
every way it cannot be read is one line naming what it was meant to be and the file, so each
reader states only its own format's rules."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from pipeline.io.storage import Location


class TextFileError(ValueError):
    """The file cannot be read as UTF-8 text; the message names ``what`` and the file."""


def read_text(source: Union[str, Path, Location], what: str, kind: str = "a file") -> str:
    """The file's UTF-8 text (a local path, or a Location on any filesystem). ``what`` names the
    file's role ("config file", "class list"), ``kind`` what a folder given instead should have
    been ("a YAML file such as jobs/configs/local.yaml")."""
    name = source.url if isinstance(source, Location) else str(source)
    try:
        data = source.read_bytes() if isinstance(source, Location) else Path(source).read_bytes()
    except FileNotFoundError:
        raise TextFileError(f"{what} not found: {name}") from None
    except IsADirectoryError:
        raise TextFileError(f"{what} {name} is a folder, not a file; give {kind}") from None
    except OSError as err:
        raise TextFileError(f"{what} {name}: cannot read it: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextFileError(f"{what} {name} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_yaml(source: Union[str, Path, Location], what: str, kind: str = "a YAML file"):
    """The file's YAML (an empty file is ``{}``); a file that cannot be read or parsed is a
    ``TextFileError`` naming ``what`` and the file. Whether the value has the right shape is the
    caller's rule."""
    import yaml
    text = read_text(source, what, kind)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        name = source.url if isinstance(source, Location) else str(source)
        raise TextFileError(f"{what} {name} is not valid YAML: {str(err).splitlines()[0]}") from None
