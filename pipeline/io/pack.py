"""Pack a folder of images into webdataset tar shards (the input format gemlabel reads)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import webdataset as wds

from pipeline.io.tar import IMAGE_EXTENSIONS
from pipeline.io.storage import Location, full_url, is_local


def sample_keys(paths: list[Path], root: Path) -> list[str]:
    """One distinct webdataset key per file: the path relative to the folder without its
    extension, dots replaced (webdataset splits keys at the first dot of the name); a file
    whose key is taken (``x.jpg`` and ``x.png``, ``a.b.jpg`` and ``a_b.jpg``) gets its extension
    appended, then a counter."""
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = path.relative_to(root).with_suffix("").as_posix().replace(".", "_")
        key, ext, n = base, path.suffix.lower().lstrip("."), 2
        if key in taken:
            key = f"{base}_{ext}"
        while key in taken:
            key, n = f"{base}_{ext}_{n}", n + 1
        taken.add(key)
        keys.append(key)
    return keys


def next_shard_number(output_prefix: Location) -> int:
    """1 + the highest ``{prefix}-NNNNNN.tar`` already there (0 for none): packing into an
    existing prefix adds shards and never overwrites one."""
    fs, path = output_prefix.fs_path
    pattern = re.compile(re.escape(path.rsplit("/", 1)[-1]) + r"-(\d{6})\.tar$")
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}-*.tar")]
    except FileNotFoundError:
        names = []
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(numbers) + 1 if numbers else 0


def _check_not_under_a_file(prefix_path: str) -> None:
    """A local prefix's folders must be (or be creatable as) folders: makedirs says only
    ``[Errno 17] File exists`` when one of them is a file."""
    folder = os.path.dirname(os.path.abspath(prefix_path))
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder) if os.path.dirname(folder) != folder else ""
    if folder and not os.path.isdir(folder):
        raise ValueError(f"output prefix {prefix_path} is under {folder}, which is a file, not a folder")


def pack_images(folder: str, output_prefix: Location, per_shard: int = 1000, pattern: str = "*") -> list[str]:
    """Write ``{output_prefix}-000000.tar, ...`` (continuing after existing shards) to a local
    path or any fsspec URL; each sample's key is the image's path relative to the folder (see
    ``sample_keys``), so labels can be traced back to their files. ``pattern`` is a glob on file
    names (e.g. ``*_image.png``). Raises ValueError for bad arguments, before writing anything."""
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
    fs.makedirs(prefix_path.rsplit("/", 1)[0] if "/" in prefix_path else ".", exist_ok=True)
    first = next_shard_number(output_prefix)
    written: list[str] = []
    keys = sample_keys(images, root)
    for number, start in enumerate(range(0, len(images), per_shard), start=first):
        url = full_url(fs, f"{prefix_path}-{number:06d}.tar")
        with output_prefix.at(url).open("wb") as stream, wds.TarWriter(stream) as sink:
            for path, key in zip(images[start:start + per_shard], keys[start:start + per_shard]):
                sink.write({"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes()})
        written.append(url)
    return written
