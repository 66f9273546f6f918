"""An export folder holds exactly one export: what it is (``_export.json``), which shards are in it
(``_done/``) and which files each wrote, so nothing a changed export no longer covers is left.

- Another export (other options, other labels, another labels fingerprint) in the folder: it is
  emptied first. A non-empty folder that is no gemlabel export is refused (nothing of the user's
  is removed).
- A shard's done marker lists the files it wrote; a marker of a shard the labels no longer hold,
  or of relabelled labels, has its files removed before anything else is written.
- The merge step's files (``annotations/<split>.json``, ``data.yaml``, ...) of the previous run
  that this run does not write again are removed.
- A truncated or stray JSON in ``_done/`` is not done (removed, the shard redone).
- Temp files of writers killed mid-write (local folders) are removed on start.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Optional

from pipeline.export.common import ExportError
from pipeline.io.storage import Location, is_local
from pipeline.store.destination import DestinationError, prepare_destination, remove_temps

log = logging.getLogger(__name__)

EXPORT_RECORD = "_export.json"


def relative(dest: Location, file: Location) -> str:
    return file.url[len(dest.url.rstrip("/")) + 1:]


def _read_json(file: Location) -> Optional[dict]:
    """The JSON object in ``file``, or None where it is missing, truncated or not an object."""
    try:
        data = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _entries(dest: Location) -> list[str]:
    fs, path = dest.fs_path
    try:
        if not fs.isdir(path):
            return []
        return fs.ls(path, detail=False, refresh=True) if not is_local(fs) else \
            [posixpath.join(path, name) for name in os.listdir(path)]
    except ExportError:
        raise
    except (OSError, ValueError) as err:
        raise ExportError(f"--dest {dest}: cannot read it: {err}") from None


def _empty(dest: Location) -> None:
    fs, path = dest.fs_path
    for entry in _entries(dest):
        fs.rm(entry, recursive=True)


def claim(dest: Location, identity: dict) -> list[str]:
    """Make ``dest`` this export's folder (see the module docstring); returns the merge files the
    previous run of this same export wrote. Raises ExportError (nothing written) when ``dest``
    cannot be an export folder."""
    record_file = dest.child(EXPORT_RECORD)
    try:
        prepare_destination(dest)
    except DestinationError as err:
        raise ExportError(str(err)) from None
    entries = _entries(dest)
    previous = _read_json(record_file) if entries else None
    if entries and previous is None and not record_file.exists():
        raise ExportError(f"--dest {dest}: not empty and not a gemlabel export folder; give an empty or new folder")
    kept: list[str] = []
    if previous is not None and all(previous.get(k) == v for k, v in identity.items()):
        kept = [f for f in previous.get("files", []) if isinstance(f, str)]
    elif entries:
        log.warning("%s held another export (other options or labels): emptied first", dest)
        _empty(dest)
    remove_temps(dest)
    try:
        record_file.write_bytes_atomic(json.dumps({**identity, "files": kept}, indent=1).encode())
    except (OSError, ValueError) as err:
        raise ExportError(f"--dest {dest}: cannot write there: {err}") from None
    return kept


def _own_file(dest: Location, name: object) -> Optional[Location]:
    """The file a record names, if it is inside ``dest`` (records are read back from the folder:
    a stray one naming ``/etc/passwd`` or ``../x`` removes nothing)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "://" in name:
        return None
    if any(part in ("", ".", "..") for part in name.replace("\\", "/").split("/")):
        return None
    file = dest.child(name)
    return file if file.url.startswith(dest.url.rstrip("/") + "/") else None


def finish_claim(dest: Location, identity: dict, previous_files: list[str], files: list[str]) -> None:
    """After the merge step: remove the previous run's merge files not written again, record these."""
    written = {relative(dest, dest.at(url)) for url in files}
    for name in previous_files:
        file = _own_file(dest, name)
        if name not in written and file is not None:
            file.remove()
    dest.child(EXPORT_RECORD).write_bytes_atomic(json.dumps({**identity, "files": sorted(written)},
                                                            indent=1).encode())


def read_done_markers(dest: Location) -> list[tuple[Location, dict]]:
    """(file, done marker) for each marker; unreadable ones are removed (their shards are not done)."""
    done = []
    for file in dest.child("_done").list_files(".json"):
        record = _read_json(file)
        if record is None or not isinstance(record.get("shard_id"), str):
            log.warning("%s is not a done marker (truncated or stray): removed, its shard is redone", file)
            file.remove()
            continue
        done.append((file, record))
    return done


def drop_shard(dest: Location, record: dict, marker: Location) -> None:
    """Remove what one exported shard wrote, then its done marker."""
    files = record.get("files")
    for name in files if isinstance(files, list) else []:
        file = _own_file(dest, name)
        if file is not None:
            file.remove()
    marker.remove()
