"""The folder a command that reads an output writes into (``export``'s, ``show``'s): checked before
any work (not a file, not under one, creatable), and cleared of the temp files that writers killed
mid-write left there (``storage.temp_path`` names them; only this command writes in its folder).
"""
from __future__ import annotations

import logging
import os

from pipeline.io.storage import TEMP_NAME, Location, is_local

log = logging.getLogger(__name__)


class DestinationError(ValueError):
    """The destination cannot hold what the command writes; the message says why."""


def prepare_destination(dest: Location, flag: str = "--dest") -> None:
    """Create ``dest`` as a folder, or raise DestinationError naming it and what is wrong."""
    fs, path = dest.fs_path
    try:
        if fs.isfile(path):
            raise DestinationError(f"{flag} {dest}: is a file, not a folder")
        if is_local(fs):
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise DestinationError(f"{flag} {dest}: not writable")
    except DestinationError:
        raise
    except (OSError, ValueError) as err:  # under a file (NotADirectoryError), /proc, read-only...
        raise DestinationError(f"{flag} {dest}: cannot create it: {getattr(err, 'strerror', None) or err}") from None


def remove_temps(dest: Location) -> int:
    """Remove leftover temp files of atomic writes anywhere under a local folder; how many."""
    fs, path = dest.fs_path
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for folder, _, names in os.walk(path):
        for name in names:
            if TEMP_NAME.match(name):
                try:
                    os.remove(os.path.join(folder, name))
                    removed += 1
                except OSError as err:
                    log.warning("could not remove the leftover temp file %s: %s", name, err)
    return removed
