"""An output with masks we know (blobs, several per class), written with the pipeline's own
schema, RLE encoder and manifest over real tar shards: for checks that need exact shapes."""
from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.store.rle import encode_mask
from pipeline.store.layout import OutputLayout, write_json
from pipeline.store.marker import shard_marker
from pipeline.store.schema import table_from_rows
from pipeline.io.shards import shard_id_for
from pipeline.io.storage import Location, file_identity, join
from tests.shards import encode, photo, write_shard

CLASSES = ["person", "dog", "sofa", "car"]
SIZE = (160, 120)  # width, height


def blob_masks(index: int) -> dict[int, np.ndarray]:
    """class_id -> mask: two discs of 'dog', an ellipse of 'car' (with a 3-pixel speck), a ring of 'sofa'."""
    width, height = SIZE
    canvases = {c: Image.new("L", SIZE, 0) for c in (1, 2, 3)}
    shift = 4 * index
    ImageDraw.Draw(canvases[1]).ellipse((10 + shift, 10, 50 + shift, 50), fill=1)
    ImageDraw.Draw(canvases[1]).ellipse((100, 60 + shift // 2, 140, 100 + shift // 2), fill=1)
    ImageDraw.Draw(canvases[3]).ellipse((60, 8, 95, 40), fill=1)
    ImageDraw.Draw(canvases[3]).rectangle((150, 2, 152, 2), fill=1)  # a 3-pixel speck
    ImageDraw.Draw(canvases[2]).ellipse((15, 65, 75, 115), fill=1)
    ImageDraw.Draw(canvases[2]).ellipse((35, 80, 55, 100), fill=0)
    return {c: np.asarray(m, dtype=bool) for c, m in canvases.items()}


def label_for(class_id: int, mask: np.ndarray, name: Optional[str] = None) -> dict:
    ys, xs = np.nonzero(mask)
    rle = encode_mask(mask)
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    return {"class_id": class_id, "name": name or CLASSES[class_id], "score": 0.5 + 0.1 * class_id, "peak_score": 0.95,
            "area": int(mask.sum()), "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                              int(ys.max() - ys.min() + 1)],
            "point_x": x, "point_y": y, "rle_size": rle["size"], "rle_counts": rle["counts"]}


def write_known_output(shard_folder: str, output: str, images: int = 3, storage_options: Optional[dict] = None,
                       local_tmp: Optional[Path] = None, nan_scores: bool = False, keys: Optional[list[str]] = None,
                       shard_name: str = "known-0000.tar", vocab: Optional[list[str]] = None,
                       fingerprint: str = "known") -> dict[str, dict[int, np.ndarray]]:
    """One shard of ``images`` photos (keys ``keys``, default k0, k1, ...) plus an error sample,
    with its input identity recorded as the worker records it; returns sample_id -> known masks.
    ``nan_scores``: the first image's labels score NaN, as an overflowing model's do. Called again
    with another ``shard_name``, it adds a shard to the same output."""
    keys = keys or [f"k{i}" for i in range(images)]
    images = len(keys)
    samples = [{"__key__": key, "jpg": encode(photo(i, SIZE), "JPEG", quality=95)} for i, key in enumerate(keys)]
    samples.append({"__key__": "broken", "jpg": b"\xff\xd8 not an image"})
    shard_url = join(shard_folder, shard_name)
    if local_tmp is not None:  # build locally, then upload
        local = write_shard(local_tmp / "known-0000.tar", samples)
        Location(shard_url, storage_options or {}).write_bytes_atomic(local.read_bytes())
    else:
        write_shard(Path(shard_url), samples)
    shard_id = shard_id_for(shard_url)
    known, rows = {}, []
    for i in range(images):
        masks = blob_masks(i)
        sample_id = f"{shard_id}/{keys[i]}"
        known[sample_id] = masks
        labels = [label_for(c, m) for c, m in sorted(masks.items())]
        if nan_scores and i == 0:
            labels = [{**label, "score": float("nan"), "peak_score": float("nan")} for label in labels]
        rows.append({"sample_id": sample_id, "key": keys[i], "shard": shard_url, "width": SIZE[0], "height": SIZE[1],
                     "status": "ok", "error": None, "labels": labels})
    rows.append({"sample_id": f"{shard_id}/broken", "key": "broken", "shard": shard_url, "width": 0, "height": 0,
                 "status": "error", "error": "decode jpg: UnidentifiedImageError: cannot identify image file",
                 "labels": []})
    layout = OutputLayout(Location(output, storage_options or {}))
    vocab = vocab or CLASSES
    write_json(layout.config_file, {"fingerprint": fingerprint, "settings": {"vocab": vocab}})
    buffer = io.BytesIO()
    pq.write_table(table_from_rows(rows, {"vocab": vocab}), buffer)
    layout.labels_file(shard_id).write_bytes_atomic(buffer.getvalue())
    identity = file_identity(Location(shard_url, storage_options or {}).stat())
    marker = shard_marker(shard_url, shard_id, fingerprint, rows, buffer.getbuffer().nbytes,
                          {"decode:UnidentifiedImageError": 1}, started=datetime.now(timezone.utc), total_s=0.0,
                          input_identity=identity)
    write_json(layout.marker_file(shard_id), marker)
    return known


def write_masks_output(shard_folder: str, output: str, images: dict[str, tuple[Image.Image, dict[int, np.ndarray]]],
                       classes: list[str], settings: Optional[dict] = None,
                       label_fields: Optional[dict[str, dict[int, dict]]] = None) -> dict[str, dict[int, np.ndarray]]:
    """One shard of the given photos, labelled with the given masks (key -> (image, class_id ->
    mask)); ``settings`` go into ``_config.json`` beside the vocabulary; ``label_fields``
    (key -> class_id -> fields) overrides labels' fields (score, points, ...). Returns sample_id -> masks."""
    shard_url = join(shard_folder, "masks-0000.tar")
    write_shard(Path(shard_url), [{"__key__": key, "png": encode(image, "PNG")} for key, (image, _) in images.items()])
    shard_id = shard_id_for(shard_url)
    known, rows = {}, []
    for key, (image, masks) in images.items():
        known[f"{shard_id}/{key}"] = masks
        labels = [{**label_for(c, m, classes[c]), **(label_fields or {}).get(key, {}).get(c, {})}
                  for c, m in sorted(masks.items())]
        rows.append({"sample_id": f"{shard_id}/{key}", "key": key, "shard": shard_url, "width": image.width,
                     "height": image.height, "status": "ok", "error": None, "labels": labels})
    layout = OutputLayout(Location(output))
    write_json(layout.config_file, {"fingerprint": "masks", "settings": {"vocab": classes, **(settings or {})}})
    buffer = io.BytesIO()
    pq.write_table(table_from_rows(rows, {"vocab": classes}), buffer)
    layout.labels_file(shard_id).write_bytes_atomic(buffer.getvalue())
    marker = shard_marker(shard_url, shard_id, "masks", rows, buffer.getbuffer().nbytes, {},
                          started=datetime.now(timezone.utc), total_s=0.0)
    write_json(layout.marker_file(shard_id), marker)
    return known
