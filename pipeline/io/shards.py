"""Input shard listing: brace patterns, globs and list files on any fsspec filesystem."""
from __future__ import annotations

import hashlib
import posixpath
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Iterable

from braceexpand import braceexpand

from pipeline.io.redact import redact_url
from pipeline.io.storage import Location, join, normalize_url, protocol_of

GLOB_CHARS = "*?["
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what globs match: a folder may also hold .parquet, .json


@dataclass(frozen=True, order=True)
class Shard:
    """One input tar. ``shard_id`` names its outputs: the file stem plus a hash of the full URL,
    stable across runs and unique even when two folders hold files of the same name."""

    url: str
    shard_id: str

    @property
    def shown(self) -> str:
        """The URL as written (rows, markers) and printed: without credentials (``redact_url``)."""
        return redact_url(self.url)


def shard_id_for(url: str) -> str:
    """From the URL without its credentials: a renewed signature or password names the same shard."""
    url = redact_url(url)
    stem = posixpath.basename(urlsplit(url).path.rstrip("/") if "://" in url else url.rstrip("/")).split(".")[0]
    return f"{stem or 'shard'}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


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
    stripping) are skipped; relative entries are relative to the list file's folder. Entries are
    literal names: no braces or globs are expanded in them."""
    text = source.read_bytes().decode("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return [source.at(_relative_to(line, source.url)) for line in lines if line and not line.startswith("#")]


def _names_a_file(pattern: Location) -> bool:
    """Whether a file exists under exactly this name (``photos [1].tar``): then it is taken literally."""
    try:
        fs, path = pattern.fs_path
        return fs.isfile(path)
    except Exception:  # noqa: BLE001 - an unreachable store or odd name: treat it as a pattern
        return False


def _is_glob(url: str) -> bool:
    """``*?[`` make a glob, except in HTTP(S) URLs, where ``?`` starts the query and nothing globs."""
    return protocol_of(url) not in ("http", "https") and any(ch in url for ch in GLOB_CHARS)


def _expand_one(pattern: Location) -> list[str]:
    if pattern.url.endswith(".txt"):
        listed = read_shard_list(pattern)
        if not listed:
            raise ValueError(f"shard list {pattern} is empty")
        return [normalize_url(entry.url) for entry in listed]
    if _is_glob(pattern.url) and not _names_a_file(pattern):
        return [match.url for match in pattern.glob() if match.url.endswith(TAR_SUFFIXES)]
    return [normalize_url(pattern.url)]


def expand_shards(patterns: Iterable[Location], allow_missing: bool = True) -> list[str]:
    """URLs of all shards named by the patterns, in order, without repeats. Plain URLs are kept
    even if missing (a missing shard is reported as a failed shard, not a crashed run); a glob
    that matches nothing is an error, since it most often means a wrong prefix. A pattern naming
    an existing file exactly is that file (no braces or globs expanded); to match a glob character
    literally in a pattern, put it in brackets (``photos [[]1].tar``)."""
    urls: list[str] = []
    for pattern in patterns:
        literal = any(ch in pattern.url for ch in "{}" + GLOB_CHARS) and _names_a_file(pattern)
        for expanded in [pattern.url] if literal else braceexpand(pattern.url):
            matches = _expand_one(pattern.at(expanded))
            if not matches and not allow_missing:
                raise ValueError(f"input pattern {redact_url(expanded)} matches no file")
            if not matches and _is_glob(expanded):
                raise ValueError(f"input glob {redact_url(expanded)} matches no file (globs match only "
                                 f"{', '.join(TAR_SUFFIXES)} files)")
            urls.extend(matches)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def list_shards(patterns: Iterable[Location]) -> list[Shard]:
    """The shards the patterns (brace patterns, globs, .txt lists, URLs) name, each read with its
    pattern's storage options."""
    shards, seen = [], {}
    for url in expand_shards(patterns):
        shard = Shard(url, shard_id_for(url))
        if shard.shard_id in seen:
            raise ValueError(f"{redact_url(seen[shard.shard_id])} and {redact_url(url)} differ only in their "
                             "credentials; give each shard once")
        seen[shard.shard_id] = url
        shards.append(shard)
    return shards
