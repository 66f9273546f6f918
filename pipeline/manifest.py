"""What is in an output prefix: its config, per-shard stats markers, failure records, run records.

    OUT/_config.json                 fingerprint + the settings that produced the labels
    OUT/labels/<shard_id>.parquet    one per input shard
    OUT/_markers/<shard_id>.json     stats marker; written after the Parquet: the shard is done
    OUT/_markers/<shard_id>.failed.json   the shard gave up after its retries (removed on success)
    OUT/_runs/<start>-<run_id>.json  one record per run

A shard is done only when its marker exists, carries the output's fingerprint, and its Parquet
file exists with the size and row count the marker recorded (``verify_markers``), so a Parquet
file left by a killed worker or driver, or deleted or damaged later, is simply written again.
Unreadable JSON files (corrupt markers, stray files) are named in one warning and skipped.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import pyarrow.parquet as pq

from pipeline.config import ConfigError
from pipeline.storage import (StorageOptions, exists, filesystem, join, list_files, read_bytes, remove,
                              write_bytes_atomic, write_bytes_if_absent)

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".json"
FAILED_SUFFIX = ".failed.json"


@dataclass(frozen=True)
class OutputLayout:
    root: str

    @property
    def config_url(self) -> str:
        return join(self.root, "_config.json")

    @property
    def labels_dir(self) -> str:
        return join(self.root, "labels")

    @property
    def markers_dir(self) -> str:
        return join(self.root, "_markers")

    @property
    def runs_dir(self) -> str:
        return join(self.root, "_runs")

    def labels_url(self, shard_id: str) -> str:
        return join(self.labels_dir, f"{shard_id}.parquet")

    def marker_url(self, shard_id: str) -> str:
        return join(self.markers_dir, shard_id + MARKER_SUFFIX)

    def failed_url(self, shard_id: str) -> str:
        return join(self.markers_dir, shard_id + FAILED_SUFFIX)

    def run_url(self, run_id: str) -> str:
        return join(self.runs_dir, f"{run_id}.json")


def _json_bytes(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


def write_json(url: str, record: dict, storage_options: Optional[StorageOptions] = None) -> None:
    write_bytes_atomic(url, _json_bytes(record), storage_options)


def _parse_json(url: str, content: Optional[bytes], required: tuple[str, ...] = ()) -> Optional[dict]:
    """The record, or None with one warning naming the file when it is not what we wrote."""
    try:
        record = json.loads(content)
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return record
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        log.warning("ignoring unreadable %s: %s", url, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _read_json_files(urls: list[str], storage_options: Optional[StorageOptions],
                     required: tuple[str, ...] = ()) -> list[dict]:
    if not urls:
        return []
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    contents = fs.cat(paths, on_error="return")  # concurrent on object stores
    records = []
    for url, path in zip(urls, paths):
        content = contents.get(path)
        record = _parse_json(url, None if isinstance(content, BaseException) else content, required)
        if record is not None:
            records.append(record)
    return records


def read_output_config(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> Optional[dict]:
    """The output's fingerprint and settings; None for an output no run has claimed yet, and
    (with a warning) for an unreadable ``_config.json``."""
    if not exists(layout.config_url, storage_options):
        return None
    return _parse_json(layout.config_url, read_bytes(layout.config_url, storage_options), ("fingerprint",))


MARKER_KEYS = ("shard", "shard_id", "fingerprint", "samples", "ok", "errors", "labels")


def read_markers(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> dict[str, dict]:
    """shard_id -> stats marker, for every shard with a readable marker in this output."""
    urls = [u for u in list_files(layout.markers_dir, storage_options, MARKER_SUFFIX) if not u.endswith(FAILED_SUFFIX)]
    return {m["shard_id"]: m for m in _read_json_files(urls, storage_options, MARKER_KEYS)}


def read_failures(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> dict[str, dict]:
    urls = list_files(layout.markers_dir, storage_options, FAILED_SUFFIX)
    return {m["shard_id"]: m for m in _read_json_files(urls, storage_options, ("shard", "shard_id", "error"))}


def read_runs(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> list[dict]:
    return _read_json_files(list_files(layout.runs_dir, storage_options, ".json"), storage_options,
                            ("run_id", "started_at"))


def _parquet_rows(url: str, storage_options: Optional[StorageOptions]) -> Optional[int]:
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception:  # any unreadable footer: the shard is not done
        return None


def verify_markers(layout: OutputLayout, markers: dict[str, dict], storage_options: Optional[StorageOptions] = None,
                   read_footers: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """Split markers into (readable, {shard_id: why not}): a shard's labels are readable when its
    Parquet file exists with the byte size the marker recorded and (``read_footers``) a footer
    that parses and counts the marker's rows. One listing of ``labels/``, footers read in parallel."""
    fs, _ = filesystem(layout.labels_dir, storage_options)
    try:
        listing = fs.ls(filesystem(layout.labels_dir, storage_options)[1], detail=True, refresh=True)
    except FileNotFoundError:
        listing = []
    sizes = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in listing}
    readable, broken = {}, {}
    for shard_id, marker in markers.items():
        name = f"{shard_id}.parquet"
        if name not in sizes:
            broken[shard_id] = "Parquet file missing"
        elif marker.get("parquet_bytes") not in (None, sizes[name]):
            broken[shard_id] = f"Parquet file has {sizes[name]} bytes, marker says {marker['parquet_bytes']}"
        else:
            readable[shard_id] = marker
    if read_footers and readable:
        with ThreadPoolExecutor(max_workers=16) as pool:
            rows = dict(zip(readable, pool.map(lambda sid: _parquet_rows(layout.labels_url(sid), storage_options),
                                               list(readable))))
        for shard_id, count in rows.items():
            if count != readable[shard_id]["samples"]:
                broken[shard_id] = ("Parquet file unreadable" if count is None else
                                    f"Parquet file has {count} rows, marker says {readable[shard_id]['samples']}")
                del readable[shard_id]
    return readable, broken


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(prefix + key)
    return changed


def _has_labels(layout: OutputLayout, storage_options: Optional[StorageOptions]) -> bool:
    return bool(list_files(layout.labels_dir, storage_options) or list_files(layout.markers_dir, storage_options))


def _claim_ended(layout: OutputLayout, claim: dict, storage_options: Optional[StorageOptions]) -> bool:
    """The run that claimed the output has finished (its run record exists)."""
    run_id = claim.get("run_id")
    return bool(run_id) and exists(layout.run_url(run_id), storage_options)


def prepare_output(layout: OutputLayout, fingerprint: str, source: dict, overwrite: bool,
                   storage_options: Optional[StorageOptions] = None, run_id: str = "") -> None:
    """Claim the output for this config. The claim is a create-if-absent write of
    ``_config.json``, so of two runs started at once on a fresh output with different settings
    exactly one proceeds. Labels of another config are refused, or with ``overwrite`` removed
    first, so labels of two configs never mix under one prefix. An output whose earlier run has
    ended having labelled nothing is simply claimed again."""
    record = _json_bytes({"fingerprint": fingerprint, "settings": source, "run_id": run_id})
    try:
        if overwrite:
            for url in (layout.labels_dir, layout.markers_dir):
                remove(url, storage_options, recursive=True)
            write_bytes_atomic(layout.config_url, record, storage_options)
            return
        if write_bytes_if_absent(layout.config_url, record, storage_options):
            return
        existing = read_output_config(layout, storage_options)
        if existing is None:  # unreadable _config.json (warned): the markers say what made the labels
            others = {m.get("fingerprint") for m in read_markers(layout, storage_options).values()} - {fingerprint}
            if others:
                raise ConfigError(f"output {layout.root}: {layout.config_url} is unreadable and the output holds "
                                  "labels made with other settings; write to a new --output, or pass --overwrite")
            write_bytes_atomic(layout.config_url, record, storage_options)
            return
        if existing["fingerprint"] == fingerprint:
            return
        if not _has_labels(layout, storage_options) and _claim_ended(layout, existing, storage_options):
            write_bytes_atomic(layout.config_url, record, storage_options)
            return
    except (FileNotFoundError, PermissionError) as err:
        raise ConfigError(f"output: cannot write to {layout.root}: {err}") from None
    changed = ", ".join(_changed_keys(existing.get("settings", {}), source)) or "unknown"
    raise ConfigError(f"output {layout.root} holds labels made with other settings, or is being labelled with "
                      f"them (changed: {changed}); write to a new --output, or pass --overwrite to replace them")
