"""What is in an output prefix: its config, per-shard stats markers, failure records, run records.

    OUT/_config.json                 fingerprint + the settings that produced the labels
    OUT/labels/<shard_id>.parquet    one per input shard
    OUT/_markers/<shard_id>.json     stats marker; written after the Parquet: the shard is done
    OUT/_markers/<shard_id>.failed.json   the shard gave up after its retries (removed on success)
    OUT/_runs/<start>-<run_id>.json  one record per run

A shard is done only when its marker exists and carries the output's fingerprint, so a Parquet
file left by a killed worker or driver is simply written again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from pipeline.config import ConfigError
from pipeline.storage import (StorageOptions, exists, filesystem, join, list_files, read_bytes, remove,
                              write_bytes_atomic)

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


def write_json(url: str, record: dict, storage_options: Optional[StorageOptions] = None) -> None:
    write_bytes_atomic(url, json.dumps(record, indent=1, sort_keys=True).encode(), storage_options)


def _read_json_files(urls: list[str], storage_options: Optional[StorageOptions]) -> list[dict]:
    if not urls:
        return []
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    contents = fs.cat(paths)  # concurrent on object stores
    return [json.loads(contents[p]) for p in paths]


def read_output_config(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> Optional[dict]:
    """The output's fingerprint and settings, or None for an output no run has claimed yet."""
    if not exists(layout.config_url, storage_options):
        return None
    return json.loads(read_bytes(layout.config_url, storage_options))


def read_markers(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> dict[str, dict]:
    """shard_id -> stats marker, for every shard done in this output."""
    urls = [u for u in list_files(layout.markers_dir, storage_options, MARKER_SUFFIX) if not u.endswith(FAILED_SUFFIX)]
    return {m["shard_id"]: m for m in _read_json_files(urls, storage_options)}


def read_failures(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> dict[str, dict]:
    urls = list_files(layout.markers_dir, storage_options, FAILED_SUFFIX)
    return {m["shard_id"]: m for m in _read_json_files(urls, storage_options)}


def read_runs(layout: OutputLayout, storage_options: Optional[StorageOptions] = None) -> list[dict]:
    return _read_json_files(list_files(layout.runs_dir, storage_options, ".json"), storage_options)


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


def prepare_output(layout: OutputLayout, fingerprint: str, source: dict, overwrite: bool,
                   storage_options: Optional[StorageOptions] = None) -> None:
    """Claim the output for this config. Labels of another config are refused, or with
    ``overwrite`` removed first, so labels of two configs never mix under one prefix. An output
    whose earlier run labelled nothing is simply claimed again."""
    existing = read_output_config(layout, storage_options)
    if overwrite:
        for url in (layout.labels_dir, layout.markers_dir):
            remove(url, storage_options, recursive=True)
    elif existing is not None and existing["fingerprint"] != fingerprint and _has_labels(layout, storage_options):
        changed = ", ".join(_changed_keys(existing.get("settings", {}), source)) or "unknown"
        raise ConfigError(f"output {layout.root} holds labels made with other settings (changed: {changed}); "
                          "write to a new --output, or pass --overwrite to replace them")
    if overwrite or existing is None or existing["fingerprint"] != fingerprint:
        try:
            write_json(layout.config_url, {"fingerprint": fingerprint, "settings": source}, storage_options)
        except (FileNotFoundError, PermissionError) as err:
            raise ConfigError(f"output: cannot write to {layout.root}: {err}") from None
