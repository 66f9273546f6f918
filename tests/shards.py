"""Build real webdataset tar shards for tests: photos, odd image modes, broken samples."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from tests.models import DATA

VOC = DATA / "voc"
PHOTOS = sorted(VOC.glob("*_image.png"))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(index: int, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.open(PHOTOS[index % len(PHOTOS)]).convert("RGB")
    return image.resize(size) if size else image


def varied_samples(count: int, prefix: str = "img") -> list[dict]:
    """Samples cycling through formats, modes and sizes (jpg, png, webp; L, RGBA, CMYK, 16-bit)."""
    samples = []
    for i in range(count):
        image = photo(i, (96 + 13 * (i % 5), 64 + 11 * (i % 7)))
        kind = i % 6
        if kind == 0:
            sample = {"jpg": encode(image, "JPEG", quality=90)}
        elif kind == 1:
            sample = {"png": encode(image.convert("L"), "PNG")}
        elif kind == 2:
            sample = {"webp": encode(image, "WEBP")}
        elif kind == 3:
            sample = {"png": encode(image.convert("RGBA"), "PNG")}
        elif kind == 4:
            sample = {"jpeg": encode(image.convert("CMYK"), "JPEG")}
        else:
            gray = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
            sample = {"png": encode(Image.fromarray(gray), "PNG")}  # mode I;16
        sample["__key__"] = f"{prefix}{i:05d}"
        sample["txt"] = f"caption {i}".encode()
        samples.append(sample)
    return samples


def write_shard(path: Path, samples: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def write_shards(folder: Path, shards: int, per_shard: int, stem: str = "shard") -> list[Path]:
    return [write_shard(folder / f"{stem}-{s:04d}.tar", varied_samples(per_shard, prefix=f"s{s}-"))
            for s in range(shards)]


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction) + 100])
