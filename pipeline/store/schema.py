"""The output table: one row per input sample, labelled or not, with a list of class labels."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.config import SCHEMA_VERSION

LABEL_FIELDS = [
    ("class_id", pa.int32()),
    ("name", pa.string()),
    ("score", pa.float32()),        # mean class probability over the mask
    ("peak_score", pa.float32()),   # class probability at the point
    ("area", pa.int64()),           # mask pixels
    ("bbox", pa.list_(pa.int32(), 4)),  # x, y, width, height in original pixels
    ("point_x", pa.int32()),
    ("point_y", pa.int32()),
    ("rle_size", pa.list_(pa.int32(), 2)),  # height, width (COCO order)
    ("rle_counts", pa.string()),    # COCO compressed RLE
    ("points", pa.list_(pa.struct([("x", pa.int32()), ("y", pa.int32()), ("score", pa.float32())]))),  # prompts
    # the class's connected components (8-connected, >= min_area, largest first, at most 64), each
    # with its first pixel in raster order, its pixels and its mean probability: instance scores
    ("instances", pa.list_(pa.struct([("x", pa.int32()), ("y", pa.int32()), ("area", pa.int64()),
                                      ("score", pa.float32())]))),
]
LABEL_TYPE = pa.struct(LABEL_FIELDS)
# the labels of outputs begun before ``instances``, which runs continuing them still write
LEGACY_LABEL_TYPE = pa.struct([f for f in LABEL_FIELDS if f[0] != "instances"])


def _schema(label_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.string()),     # shard_id/key, unique in the output
        ("key", pa.string()),
        ("shard", pa.string()),         # the input shard URL
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),        # "ok" or "error"
        ("error", pa.string()),
        ("labels", pa.list_(label_type)),
    ])


SCHEMA = _schema(LABEL_TYPE)
LEGACY_SCHEMA = _schema(LEGACY_LABEL_TYPE)

METADATA_KEY = b"gemlabel"


def table_from_rows(rows: list[dict], run_metadata: dict, instances: bool = True) -> pa.Table:
    """Rows (dicts with SCHEMA's fields) -> table carrying the run's config in its metadata;
    without ``instances``, in the schema of outputs begun before them (the field left out)."""
    metadata = {METADATA_KEY: json.dumps({**run_metadata, "schema_version": SCHEMA_VERSION}).encode()}
    schema = SCHEMA if instances else LEGACY_SCHEMA
    return pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata))


def run_metadata_of(schema: pa.Schema) -> dict:
    return json.loads(schema.metadata[METADATA_KEY])
