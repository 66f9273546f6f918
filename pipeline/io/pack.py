"""Pack a folder of images into webdataset tar shards (the input format gemlabel reads).

Packing is idempotent: beside each shard ``{prefix}-NNNNNN.tar`` a record
``{prefix}-NNNNNN.packed.json`` lists its files (path relative to the folder, SHA-256 of the
content, sample key). Packing again into the prefix skips every file already packed there with
the same content, so rerunning a pack never makes a second copy of an image (which the next
``label`` would label twice); new and changed files go into new shards, never over one. A shard
without a record (packed before records existed, or a pack killed before writing it) is read
once to learn what it holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds

from pipeline.io.tar import IMAGE_EXTENSIONS, iter_tar_samples
from pipeline.io.storage import Location, full_url, is_local


def sample_keys(paths: list[Path], root: Path) -> list[str]:
    """One distinct webdataset key per file: the path relative to the folder without its
    extension, dots replaced (webdataset splits keys at the first dot of the name); a file
    whose key is taken (``x.jpg`` and ``x.png``, ``a.b.jpg`` and ``a_b.jpg``) gets its extension
    appended, then a counter."""
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = _base_key(path.relative_to(root))
        key, ext, n = base, path.suffix.lower().lstrip("."), 2
        if key in taken:
            key = f"{base}_{ext}"
        while key in taken:
            key, n = f"{base}_{ext}_{n}", n + 1
        taken.add(key)
        keys.append(key)
    return keys


RECORD_SUFFIX = ".packed.json"


def _existing_shards(output_prefix: Location) -> dict[int, str]:
    """Number -> path of every ``{prefix}-NNNNNN.tar`` already there."""
    fs, path = output_prefix.fs_path
    pattern = re.compile(re.escape(path.rsplit("/", 1)[-1]) + r"-(\d{6})\.tar$")
    try:
        paths = fs.glob(f"{path}-*.tar")
    except FileNotFoundError:
        paths = []
    return {int(m.group(1)): p for p in paths if (m := pattern.match(p.rsplit("/", 1)[-1]))}


def next_shard_number(output_prefix: Location) -> int:
    """1 + the highest ``{prefix}-NNNNNN.tar`` already there (0 for none): packing into an
    existing prefix adds shards and never overwrites one."""
    numbers = _existing_shards(output_prefix)
    return max(numbers) + 1 if numbers else 0


def _check_not_under_a_file(prefix_path: str) -> None:
    """A local prefix's folders must be (or be creatable as) folders: makedirs says only
    ``[Errno 17] File exists`` when one of them is a file."""
    folder = os.path.dirname(os.path.abspath(prefix_path))
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder) if os.path.dirname(folder) != folder else ""
    if folder and not os.path.isdir(folder):
        raise ValueError(f"output prefix {prefix_path} is under {folder}, which is a file, not a folder")


def record_path(shard_path: str) -> str:
    return shard_path[: -len(".tar")] + RECORD_SUFFIX


@dataclass
class PackedFiles:
    """What a prefix already holds: (relative path, SHA-256) from records, and (key, SHA-256) of
    the samples of shards without a record."""

    recorded: set[tuple[str, str]] = field(default_factory=set)
    unrecorded: dict[str, set[str]] = field(default_factory=dict)  # sha256 -> sample keys

    def holds(self, relative: str, digest: str) -> bool:
        if (relative, digest) in self.recorded:
            return True
        base = _base_key(Path(relative))
        return any(key == base or key.startswith(base + "_") for key in self.unrecorded.get(digest, ()))


def read_packed(output_prefix: Location) -> PackedFiles:
    """Every file already packed under the prefix (see the module docstring)."""
    fs, _ = output_prefix.fs_path
    packed = PackedFiles()
    for path in _existing_shards(output_prefix).values():
        record = output_prefix.at(full_url(fs, record_path(path)))
        if record.exists():
            for entry in json.loads(record.read_bytes())["files"]:
                packed.recorded.add((entry["path"], entry["sha256"]))
            continue
        try:
            for sample in iter_tar_samples(output_prefix.at(full_url(fs, path))):
                for ext in IMAGE_EXTENSIONS:
                    if ext in sample:
                        packed.unrecorded.setdefault(_digest(sample[ext]), set()).add(sample["__key__"])
        except Exception:  # a shard cut short by a killed pack: what it holds whole was counted
            pass
    return packed


def _base_key(relative: Path) -> str:
    return relative.with_suffix("").as_posix().replace(".", "_")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PackResult:
    shards: list[str]  # the shards written by this call
    files: int         # files put into them
    skipped: int       # files already packed under the prefix with the same content


def _write_shard(url: Location, files: Iterable[tuple[Path, str, str, bytes]]) -> None:
    """The tar first, then its record: a record only ever names a shard that is whole."""
    entries = []
    with url.open("wb") as stream, wds.TarWriter(stream) as sink:
        for path, relative, key, data in files:
            sink.write({"__key__": key, path.suffix.lower().lstrip("."): data})
            entries.append({"path": relative, "sha256": _digest(data), "key": key})
    fs, path = url.fs_path
    url.at(full_url(fs, record_path(path))).write_bytes_atomic(
        json.dumps({"shard": url.name, "files": entries}, indent=1).encode())


def pack_images(folder: str, output_prefix: Location, per_shard: int = 1000, pattern: str = "*") -> PackResult:
    """Write the folder's images not yet packed under the prefix into ``{output_prefix}-NNNNNN.tar``
    (continuing after existing shards) on a local path or any fsspec URL; each sample's key is the
    image's path relative to the folder (see ``sample_keys``), so labels can be traced back to
    their files. ``pattern`` is a glob on file names (e.g. ``*_image.png``). Raises ValueError for
    bad arguments, before writing anything."""
    if per_shard < 1:
        raise ValueError(f"--per-shard must be at least 1, got {per_shard}")
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder")
    images = sorted(p for p in root.rglob(pattern) if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images matching {pattern} under {folder}")
    fs, prefix_path = output_prefix.fs_path
    if is_local(fs):
        _check_not_under_a_file(prefix_path)
    packed = read_packed(output_prefix)
    todo = [(path, path.relative_to(root).as_posix()) for path in images]
    todo = [(path, relative) for path, relative in todo if not packed.holds(relative, _digest(path.read_bytes()))]
    result = PackResult([], len(todo), len(images) - len(todo))
    if not todo:
        return result
    fs.makedirs(prefix_path.rsplit("/", 1)[0] if "/" in prefix_path else ".", exist_ok=True)
    keys = sample_keys([path for path, _ in todo], root)
    for number, start in enumerate(range(0, len(todo), per_shard), start=next_shard_number(output_prefix)):
        url = output_prefix.at(full_url(fs, f"{prefix_path}-{number:06d}.tar"))
        batch = zip(todo[start:start + per_shard], keys[start:start + per_shard])
        _write_shard(url, ((path, relative, key, path.read_bytes()) for (path, relative), key in batch))
        result.shards.append(url.url)
    return result
