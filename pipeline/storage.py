"""Filesystem access for any fsspec URL (local paths, s3://, gs://, http(s)://).

Options are given per protocol (``{"s3": {"endpoint_url": ...}}``) so one run can read from one
store and write to another. Writes are atomic: a reader sees the whole file or none of it.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Optional

import fsspec
from fsspec.core import url_to_fs

StorageOptions = dict[str, dict[str, Any]]

_S3_CLIENT_KEYS = ("endpoint_url", "region_name")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _options_for(url: str, storage_options: Optional[StorageOptions]) -> dict[str, Any]:
    options = dict((storage_options or {}).get(protocol_of(url), {}))
    if protocol_of(url) in ("s3", "s3a"):
        # Accept endpoint_url at the top level: s3fs wants it under client_kwargs.
        client_kwargs = dict(options.pop("client_kwargs", {}))
        for key in _S3_CLIENT_KEYS:
            if key in options:
                client_kwargs[key] = options.pop(key)
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
    return options


def filesystem(url: str, storage_options: Optional[StorageOptions] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL."""
    return url_to_fs(url, **_options_for(url, storage_options))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as returned by fs.glob/ls, back to a URL: absolute path for local files, else
    with its protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def normalize_url(url: str) -> str:
    """One spelling per file: local paths absolute and without file://."""
    if protocol_of(url) == "file":
        return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)
    return url


def join(url: str, *parts: str) -> str:
    if protocol_of(url) == "file" and "://" not in url:
        return posixpath.join(url, *parts)
    return "/".join([url.rstrip("/"), *parts])


def open_file(url: str, mode: str = "rb", storage_options: Optional[StorageOptions] = None):
    return fsspec.open(url, mode, **_options_for(url, storage_options)).open()


def read_bytes(url: str, storage_options: Optional[StorageOptions] = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: Optional[StorageOptions] = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def temp_path(path: str) -> str:
    """Where a local atomic write puts its data first: a hidden name (leading dot) in the same
    folder, which Hive-style dataset readers (pyarrow.dataset, pandas, Spark) skip."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


def _write_local_temp(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temp = temp_path(path)
    with fs.open(temp, "wb") as handle:
        handle.write(data)
    return temp


def write_bytes_atomic(url: str, data: bytes, storage_options: Optional[StorageOptions] = None) -> None:
    """Write all of ``data`` or nothing. Local files: temp file + rename. Object stores: one PUT
    (an object appears only once its upload completes)."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        temp = _write_local_temp(fs, path, data)
        try:
            fs.mv(temp, path)
        finally:
            if fs.exists(temp):
                fs.rm(temp)
    else:
        fs.pipe_file(path, data)


def write_bytes_if_absent(url: str, data: bytes, storage_options: Optional[StorageOptions] = None) -> bool:
    """Create ``url`` with all of ``data`` unless it exists; True if this call created it. One
    winner even when several processes race: a hard link (fails if the name exists) locally, a
    conditional PUT (``If-None-Match: *``) on object stores."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        temp = _write_local_temp(fs, path, data)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(temp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


def file_identity(info: Optional[dict]) -> Optional[dict]:
    """What tells one version of a file from another: its size, and its etag (object stores) or
    modification time; None when unknown."""
    if not info:
        return None
    identity: dict = {"size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        identity["etag"] = str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if mtime is not None:
        identity["mtime"] = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime
    return identity


def same_file_version(old: Optional[dict], new: Optional[dict]) -> bool:
    """False only when both identities are known and differ (a replaced or rewritten file)."""
    if not old or not new:
        return True
    if old.get("size") != new.get("size"):
        return False
    for key in ("etag", "mtime"):
        if key in old and key in new:
            return old[key] == new[key]
    return True


def stat_file(url: str, storage_options: Optional[StorageOptions] = None) -> Optional[dict]:
    """fsspec info (size, etag/mtime) of one file, or None where unknown."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.info(path)
    except (OSError, ValueError):
        return None


def stat_files(urls: list[str], storage_options: Optional[StorageOptions] = None) -> dict[str, Optional[dict]]:
    """URL -> fsspec info (size, etag/mtime) or None where unknown; one listing per folder."""
    infos: dict[str, Optional[dict]] = {}
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    for folder, members in by_folder.items():
        fs, _ = filesystem(members[0], storage_options)
        listing: dict[str, dict] = {}
        if fs.protocol not in ("http", "https", ("http", "https")):
            try:
                listing = {full_url(fs, e["name"]): e for e in fs.ls(filesystem(folder, storage_options)[1],
                                                                     detail=True, refresh=True)}
            except (OSError, ValueError):
                listing = {}
        for url in members:
            info = listing.get(url)
            if info is None:
                try:
                    info = fs.info(filesystem(url, storage_options)[1])
                except (OSError, ValueError):
                    info = None
            infos[url] = info
    return infos


def remove(url: str, storage_options: Optional[StorageOptions] = None, recursive: bool = False) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_files(url: str, storage_options: Optional[StorageOptions] = None, suffix: str = "") -> list[str]:
    """URLs of the files directly under a prefix (none if it does not exist)."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(full_url(fs, e["name"]) for e in entries if e["type"] == "file" and e["name"].endswith(suffix))
