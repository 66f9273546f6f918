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
from pipeline.io.storage import Location

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".json"
FAILED_SUFFIX = ".failed.json"


@dataclass(frozen=True)
class OutputLayout:
    """Where each file of an output lives; every one a Location carrying the root's options."""

    root: Location

    @property
    def config_file(self) -> Location:
        return self.root.child("_config.json")

    @property
    def labels_dir(self) -> Location:
        return self.root.child("labels")

    @property
    def markers_dir(self) -> Location:
        return self.root.child("_markers")

    @property
    def runs_dir(self) -> Location:
        return self.root.child("_runs")

    @property
    def cache_dir(self) -> Location:
        return self.root.child("_cache")

    def labels_file(self, shard_id: str) -> Location:
        return self.labels_dir.child(f"{shard_id}.parquet")

    def marker_file(self, shard_id: str) -> Location:
        return self.markers_dir.child(shard_id + MARKER_SUFFIX)

    def failed_file(self, shard_id: str) -> Location:
        return self.markers_dir.child(shard_id + FAILED_SUFFIX)

    def run_file(self, run_id: str) -> Location:
        return self.runs_dir.child(f"{run_id}.json")

    def remove_stale_temps(self, modified_before: float) -> int:
        """Temp files of atomic writes in every folder of the output, left by writers killed
        mid-write before ``modified_before`` (see ``Location.remove_stale_temps``); how many."""
        folders = (self.root, self.labels_dir, self.markers_dir, self.runs_dir, self.cache_dir)
        return sum(folder.remove_stale_temps(modified_before) for folder in folders)


def _json_bytes(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


def write_json(file: Location, record: dict) -> None:
    file.write_bytes_atomic(_json_bytes(record))


def _parse_json(file: Location, content: Optional[bytes], required: tuple[str, ...] = ()) -> Optional[dict]:
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
        log.warning("ignoring unreadable %s: %s", file, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _read_json_files(files: list[Location], required: tuple[str, ...] = ()) -> list[dict]:
    if not files:
        return []
    fs, _ = files[0].fs_path
    paths = [file.path for file in files]
    contents = fs.cat(paths, on_error="return")  # concurrent on object stores
    records = []
    for file, path in zip(files, paths):
        content = contents.get(path)
        record = _parse_json(file, None if isinstance(content, BaseException) else content, required)
        if record is not None:
            records.append(record)
    return records


def read_output_config(layout: OutputLayout) -> Optional[dict]:
    """The output's fingerprint and settings; None for an output no run has claimed yet, and
    (with a warning) for an unreadable ``_config.json``."""
    if not layout.config_file.exists():
        return None
    return _parse_json(layout.config_file, layout.config_file.read_bytes(), ("fingerprint",))


def claimed_settings(layout: OutputLayout) -> Optional[dict]:
    """The output's ``_config.json`` if it can be read now, else None: for choosing how to
    continue it; ``check_output_claim`` reports why it cannot be read."""
    try:
        return read_output_config(layout)
    except Exception:  # noqa: BLE001 -- unreadable or unreachable: reported by check_output_claim
        return None


MARKER_KEYS = ("shard", "shard_id", "fingerprint", "samples", "ok", "errors", "labels")


def read_markers(layout: OutputLayout) -> dict[str, dict]:
    """shard_id -> stats marker, for every shard with a readable marker in this output."""
    files = [f for f in layout.markers_dir.list_files(MARKER_SUFFIX) if not f.url.endswith(FAILED_SUFFIX)]
    return {m["shard_id"]: m for m in _read_json_files(files, MARKER_KEYS)}


def read_failures(layout: OutputLayout) -> dict[str, dict]:
    files = layout.markers_dir.list_files(FAILED_SUFFIX)
    return {m["shard_id"]: m for m in _read_json_files(files, ("shard", "shard_id", "error"))}


def read_runs(layout: OutputLayout) -> list[dict]:
    return _read_json_files(layout.runs_dir.list_files(".json"), ("run_id", "started_at"))


def _parquet_rows(file: Location) -> Optional[int]:
    fs, path = file.fs_path
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception:  # any unreadable footer: the shard is not done
        return None


def verify_markers(layout: OutputLayout, markers: dict[str, dict],
                   read_footers: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """Split markers into (readable, {shard_id: why not}): a shard's labels are readable when its
    Parquet file exists with the byte size the marker recorded and (``read_footers``) a footer
    that parses and counts the marker's rows. One listing of ``labels/``, footers read in parallel."""
    fs, path = layout.labels_dir.fs_path
    try:
        listing = fs.ls(path, detail=True, refresh=True)
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
            rows = dict(zip(readable, pool.map(lambda sid: _parquet_rows(layout.labels_file(sid)), list(readable))))
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


def _has_labels(layout: OutputLayout) -> bool:
    return bool(layout.labels_dir.list_files() or layout.markers_dir.list_files())


def _claim_ended(layout: OutputLayout, claim: dict) -> bool:
    """The run that claimed the output has finished (its run record exists)."""
    run_id = claim.get("run_id")
    return bool(run_id) and layout.run_file(run_id).exists()


def _refusal(layout: OutputLayout, existing: dict, source: dict) -> ConfigError:
    changed = ", ".join(_changed_keys(existing.get("settings", {}), source)) or "unknown"
    return ConfigError(f"output {layout.root} holds labels made with other settings, or is being labelled with "
                       f"them (changed: {changed}); write to a new --output, or pass --overwrite to replace them")


def _refuses(layout: OutputLayout, existing: dict, fingerprint: str) -> bool:
    """A readable claim of other settings holds unless its run ended having labelled nothing."""
    return existing["fingerprint"] != fingerprint and (_has_labels(layout) or not _claim_ended(layout, existing))


def check_output_claim(layout: OutputLayout, fingerprint: str, source: dict, overwrite: bool) -> None:
    """Refuse an output claimed with other settings, reading only: the driver calls it before it
    starts or joins Ray, so a changed config fails in a second, not after the cluster is up.
    ``prepare_output`` still makes the claim (and decides races) atomically later."""
    if overwrite:
        return
    try:
        existing = read_output_config(layout)
    except (FileNotFoundError, PermissionError) as err:
        raise ConfigError(f"output: cannot read {layout.root}: {err}") from None
    if existing is not None and _refuses(layout, existing, fingerprint):
        raise _refusal(layout, existing, source)


def prepare_output(layout: OutputLayout, fingerprint: str, source: dict, overwrite: bool, run_id: str = "") -> None:
    """Claim the output for this config. The claim is a create-if-absent write of
    ``_config.json``, so of two runs started at once on a fresh output with different settings
    exactly one proceeds. Labels of another config are refused, or with ``overwrite`` removed
    first, so labels of two configs never mix under one prefix. An output whose earlier run has
    ended having labelled nothing is simply claimed again."""
    record = _json_bytes({"fingerprint": fingerprint, "settings": source, "run_id": run_id})
    try:
        if overwrite:
            for folder in (layout.labels_dir, layout.markers_dir):
                folder.remove(recursive=True)
            layout.config_file.write_bytes_atomic(record)
            return
        if layout.config_file.write_bytes_if_absent(record):
            return
        existing = read_output_config(layout)
        if existing is None:  # unreadable _config.json (warned): the markers say what made the labels
            others = {m.get("fingerprint") for m in read_markers(layout).values()} - {fingerprint}
            if others:
                raise ConfigError(f"output {layout.root}: {layout.config_file} is unreadable and the output holds "
                                  "labels made with other settings; write to a new --output, or pass --overwrite")
            layout.config_file.write_bytes_atomic(record)
            return
        if not _refuses(layout, existing, fingerprint):
            if existing["fingerprint"] != fingerprint:
                layout.config_file.write_bytes_atomic(record)
            return
    except (FileNotFoundError, PermissionError) as err:
        raise ConfigError(f"output: cannot write to {layout.root}: {err}") from None
    raise _refusal(layout, existing, source)
