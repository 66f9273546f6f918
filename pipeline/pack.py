"""Pack a folder of images into webdataset tar shards (the input format gemlabel reads)."""
from __future__ import annotations

from pathlib import Path

import webdataset as wds

from pipeline.reader import IMAGE_EXTENSIONS


def sample_key(path: Path, root: Path) -> str:
    """A packed image's key: its path relative to the folder, without extension (dots -> _)."""
    return path.relative_to(root).with_suffix("").as_posix().replace(".", "_")


def pack_images(folder: str, output_prefix: str, per_shard: int = 1000, pattern: str = "*") -> list[str]:
    """Write ``{output_prefix}-000000.tar, ...``; each sample's key is the image's path relative to
    the folder (without extension), so labels can be traced back to their files. ``pattern`` is a
    glob on file names (e.g. ``*_image.png``)."""
    root = Path(folder)
    images = sorted(p for p in root.rglob(pattern) if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images matching {pattern} under {folder}")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(f"{output_prefix}-%06d.tar", maxcount=per_shard, verbose=0,
                         post=written.append) as sink:
        for path in images:
            sink.write({"__key__": sample_key(path, root), path.suffix.lower().lstrip("."): path.read_bytes()})
    return written
