"""Filesystem access for any fsspec URL (local paths, s3://, gs://, http(s)://).

A ``Location`` is a URL bound to the storage options it is read and written with, so the two
travel as one value (as fsspec's ``DirFileSystem`` binds a filesystem to its root). Options are
given per protocol (``{"s3": {"endpoint_url": ...}}``) so one run can read from one store and
write to another. Writes are atomic: a reader sees the whole file or none of it.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

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


TEMP_NAME = re.compile(r"^\.(?P<of>.+)\.tmp-[0-9a-f]{32}$")  # the name temp_path gives, and whose it is


def temp_path(path: str) -> str:
    """Where a local atomic write puts its data first: a hidden name (leading dot) in the same
    folder, which Hive-style dataset readers (pyarrow.dataset, pandas, Spark) skip."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


def _write_local_temp(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """The temp file holding all of ``data``; on any failure (a full disk, a size limit, Ctrl-C)
    none is left behind."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temp = temp_path(path)
    try:
        with fs.open(temp, "wb") as handle:
            handle.write(data)
    except BaseException:
        try:
            os.remove(temp)
        except OSError:  # never created, or not ours to remove: nothing more this can do
            pass
        raise
    return temp


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


@dataclass(frozen=True)
class Location:
    """A file or folder URL with the (per-protocol) storage options to reach it and whatever
    ``at`` or ``child`` leads to from it. Holds no live filesystem, so it pickles cleanly (Ray
    ships it to actors); fsspec's instance cache makes the filesystem once per process."""

    url: str
    storage_options: StorageOptions = field(default_factory=dict)

    def __str__(self) -> str:
        return self.url

    def __hash__(self) -> int:  # the options dict is unhashable; equal locations share a URL
        return hash(self.url)

    def at(self, url: str) -> "Location":
        """Another URL (a shard, a list entry, another store) with the same options."""
        return Location(url, self.storage_options)

    def child(self, *parts: str) -> "Location":
        return self.at(join(self.url, *parts))

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return self.at(self.url.rsplit("/", 1)[0])

    @property
    def fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path within it)."""
        return url_to_fs(self.url, **_options_for(self.url, self.storage_options))

    @property
    def path(self) -> str:
        return self.fs_path[1]

    def open(self, mode: str = "rb") -> IO[bytes]:
        return fsspec.open(self.url, mode, **_options_for(self.url, self.storage_options)).open()

    def read_bytes(self) -> bytes:
        fs, path = self.fs_path
        return fs.cat_file(path)

    def exists(self) -> bool:
        fs, path = self.fs_path
        return fs.exists(path)

    def stat(self) -> Optional[dict]:
        """fsspec info (size, etag/mtime) of the file, or None where unknown."""
        fs, path = self.fs_path
        try:
            return fs.info(path)
        except (OSError, ValueError):
            return None

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write all of ``data`` or nothing. Local files: temp file + rename. Object stores: one
        PUT (an object appears only once its upload completes)."""
        fs, path = self.fs_path
        if is_local(fs):
            temp = _write_local_temp(fs, path, data)
            try:
                fs.mv(temp, path)
            finally:
                if fs.exists(temp):
                    fs.rm(temp)
        else:
            fs.pipe_file(path, data)

    def write_bytes_if_absent(self, data: bytes) -> bool:
        """Create the file with all of ``data`` unless it exists; True if this call created it.
        One winner even when several processes race: a hard link (fails if the name exists)
        locally, a conditional PUT (``If-None-Match: *``) on object stores."""
        fs, path = self.fs_path
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

    def remove_stale_temps(self, modified_before: float, of: Optional[str] = None) -> int:
        """In this folder, remove the temp files of atomic writes (``temp_path``) last modified
        before ``modified_before`` (seconds since the epoch), only those of the file named ``of``
        when given; how many. A writer killed mid-write (an actor killed, a node lost) leaves its
        temp file behind, while a live writer's is being written or renamed, and so is newer.
        Best effort (a file it cannot remove is logged, not raised), and only names are listed:
        only temp files are looked at. Local folders only: object stores write in one request."""
        fs, folder = self.fs_path
        if not is_local(fs):
            return 0
        try:
            names = fs.ls(folder, detail=False)
        except OSError:  # no such folder yet, or unreadable: nothing this can clear
            return 0
        return _remove_temps(fs, names, modified_before, of)

    def remove_temps_below(self, modified_before: float) -> int:
        """``remove_stale_temps`` for this folder and every folder below it (a destination that
        export or show writes a tree into, cleaned when they start); how many were removed."""
        fs, folder = self.fs_path
        if not is_local(fs):
            return 0
        try:
            names = fs.find(folder)
        except OSError:
            return 0
        return _remove_temps(fs, names, modified_before)

    def remove(self, recursive: bool = False) -> None:
        fs, path = self.fs_path
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def list_files(self, suffix: str = "") -> list["Location"]:
        """The files directly under this prefix, by URL (none if it does not exist)."""
        fs, path = self.fs_path
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [self.at(url) for url in sorted(full_url(fs, e["name"]) for e in entries
                                               if e["type"] == "file" and e["name"].endswith(suffix))]

    def glob(self) -> list["Location"]:
        """What this URL, read as a glob pattern, matches, in path order."""
        fs, path = self.fs_path
        return [self.at(full_url(fs, p)) for p in sorted(fs.glob(path))]


def _remove_temps(fs: fsspec.AbstractFileSystem, names: list[str], modified_before: float,
                  of: Optional[str] = None) -> int:
    """Remove, of the listed local paths, the atomic writes' temp files (of the file named ``of``
    when given) last modified before ``modified_before``; best effort; how many."""
    removed = 0
    for name in names:
        match = TEMP_NAME.match(posixpath.basename(name))
        if not match or (of is not None and match["of"] != of):
            continue
        try:
            info = fs.info(name)
            if info["type"] == "file" and info.get("mtime", modified_before) < modified_before:
                fs.rm(name)
                removed += 1
        except FileNotFoundError:  # another cleaner was first
            pass
        except OSError as err:  # not ours to remove (permissions), a stale NFS handle...
            log.warning("could not remove the leftover temp file %s: %s", name, err)
    return removed


def stat_files(files: list[Location]) -> dict[str, Optional[dict]]:
    """URL -> fsspec info (size, etag/mtime) or None where unknown; one listing per folder."""
    infos: dict[str, Optional[dict]] = {}
    by_folder: dict[str, list[Location]] = {}
    for file in files:
        by_folder.setdefault(file.parent.url, []).append(file)
    for members in by_folder.values():
        fs, folder = members[0].parent.fs_path
        listing: dict[str, dict] = {}
        if fs.protocol not in ("http", "https", ("http", "https")):
            try:
                listing = {full_url(fs, e["name"]): e for e in fs.ls(folder, detail=True, refresh=True)}
            except (OSError, ValueError):
                listing = {}
        for file in members:
            infos[file.url] = listing.get(file.url) or file.stat()
    return infos
