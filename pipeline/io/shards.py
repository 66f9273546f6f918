"""Input shard listing: brace patterns, globs and list files on any fsspec filesystem."""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Iterable

from braceexpand import braceexpand

from pipeline.io.storage import Location, join, normalize_url, protocol_of

GLOB_CHARS = "*?["
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what globs match: a folder may also hold .parquet, .json


@dataclass(frozen=True, order=True)
class Shard:
    """One input tar. ``shard_id`` names its outputs: the file stem plus a hash of the full URL,
    stable across runs and unique even when two folders hold files of the same name."""

    url: str
    shard_id: str


def shard_id_for(url: str) -> str:
    stem = posixpath.basename(url.rstrip("/")).split(".")[0] or "shard"
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def _relative_to(entry: str, list_url: str) -> str:
    """A list entry: URLs and absolute paths as they are, relative ones against the list's folder."""
    if "://" in entry or posixpath.isabs(entry):
        return entry
    folder = list_url.rsplit("/", 1)[0] if "/" in list_url else "."
    if protocol_of(list_url) == "file":
        return posixpath.normpath(join(normalize_url(folder), entry))
    return join(folder, entry)


def read_shard_list(source: Location) -> list[Location]:
    """Entries of a .txt shard list: one a line; blank lines and lines starting with # (after
    stripping) are skipped; relative entries are relative to the list file's folder."""
    text = source.read_bytes().decode("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [source.at(_relative_to(line, source.url)) for line in lines if line and not line.startswith("#")]


def _expand_one(pattern: Location) -> list[str]:
    if pattern.url.endswith(".txt"):
        listed = read_shard_list(pattern)
        if not listed:
            raise ValueError(f"shard list {pattern} is empty")
        return expand_shards(listed, allow_missing=True)
    if any(ch in pattern.url for ch in GLOB_CHARS):
        return [match.url for match in pattern.glob() if match.url.endswith(TAR_SUFFIXES)]
    return [normalize_url(pattern.url)]


def expand_shards(patterns: Iterable[Location], allow_missing: bool = True) -> list[str]:
    """URLs of all shards named by the patterns, in order, without repeats. Plain URLs are kept
    even if missing (a missing shard is reported as a failed shard, not a crashed run); a glob
    that matches nothing is an error, since it most often means a wrong prefix."""
    urls: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern.url):
            matches = _expand_one(pattern.at(expanded))
            if not matches and not allow_missing:
                raise ValueError(f"input pattern {expanded} matches no file")
            if not matches and any(ch in expanded for ch in GLOB_CHARS):
                raise ValueError(f"input glob {expanded} matches no file (globs match only {', '.join(TAR_SUFFIXES)} files)")
            urls.extend(matches)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def list_shards(patterns: Iterable[Location]) -> list[Shard]:
    """The shards the patterns (brace patterns, globs, .txt lists, URLs) name, each read with its
    pattern's storage options."""
    return [Shard(url, shard_id_for(url)) for url in expand_shards(patterns)]
