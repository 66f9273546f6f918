"""Read a gemlabel output back and check it the way a consumer of the labels would."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.store.rle import decode_mask
from pipeline.store.layout import OutputLayout
from pipeline.io.storage import Location, temp_path


def read_tables(output: str, storage_options=None) -> dict[str, "pq.Table"]:
    tables = {}
    for file in OutputLayout(Location(output, storage_options or {})).labels_dir.list_files(".parquet"):
        fs, path = file.fs_path
        with fs.open(path, "rb") as handle:
            tables[file.name] = pq.read_table(handle)
    return tables


def all_rows(output: str, storage_options=None) -> list[dict]:
    return [row for table in read_tables(output, storage_options).values() for row in table.to_pylist()]


def check_labels(row: dict) -> None:
    """Every label's RLE decodes to the image's size and agrees with its area, bbox and point."""
    covered = np.zeros((row["height"], row["width"]), dtype=np.int32)
    for label in row["labels"]:
        mask = decode_mask(label["rle_size"], label["rle_counts"])
        assert mask.shape == (row["height"], row["width"])
        assert mask.sum() == label["area"] > 0
        assert mask[label["point_y"], label["point_x"]]
        x, y, w, h = label["bbox"]
        assert mask[y:y + h, x:x + w].sum() == label["area"]
        assert 0.0 < label["score"] <= label["peak_score"] <= 1.0
        covered += mask
    assert covered.max() <= 1  # one class per pixel


def leftover_temp(path: str, modified: float) -> Path:
    """The temp file a writer of ``path`` killed mid-write leaves (named as ``temp_path`` names
    it), last modified at ``modified`` (seconds since the epoch)."""
    temp = Path(temp_path(path))
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half a file")
    os.utime(temp, (modified, modified))
    return temp


def strict_json(file: Path):
    """A JSON file read as strict parsers (a browser's, jq, Go's, Java's) read it: ``NaN`` and
    ``Infinity`` are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(file.read_text(), parse_constant=refuse)
