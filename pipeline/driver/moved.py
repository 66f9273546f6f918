"""Input shards that moved: recognised by their content identity, their labels moved with them.

A shard id hashes the shard's URL, so an input folder moved (``mv``, ``aws s3 mv``, a bucket
renamed) would make every shard new: labelled again and its rows in the output twice. A shard with
no labels of its own whose file name, size and etag (object stores) or modification time (local
files, kept by ``mv``, ``cp -p``, ``rsync -a``) equal a done shard's that is no longer among the
inputs is that shard, moved: its labels are rewritten under the new URL's id (the rows' ``shard``
and ``sample_id`` follow the new URL) and the old shard's files removed, with one line saying so.
"""
from __future__ import annotations

import io
import posixpath
from typing import Iterable, Optional
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.shards import Shard
from pipeline.store.layout import OutputLayout, write_json


def _name(url: str) -> str:
    return posixpath.basename(urlsplit(url).path if "://" in url else url)


def content_key(url: str, identity: Optional[dict]) -> Optional[tuple]:
    """What names a shard's content whatever its folder: name, size and etag (else mtime); None
    when the identity is too weak to tell (size alone: many tars have one size)."""
    if not identity or identity.get("size") is None:
        return None
    for kind in ("etag", "mtime"):
        if identity.get(kind) is not None:
            return _name(url), identity["size"], kind, identity[kind]
    return None


def find_moved(shards: Iterable[Shard], todo: Iterable[Shard], markers: dict[str, dict],
               inputs: dict[str, Optional[dict]], fingerprint: str) -> dict[Shard, dict]:
    """Shards to label that are a done shard moved (shard -> the old shard's marker). Only markers
    of this fingerprint whose shard is not among this run's ``shards`` count, each for one shard."""
    current = {shard.shard_id for shard in shards}
    old: dict[tuple, list[dict]] = {}
    for shard_id, marker in markers.items():
        key = content_key(marker.get("shard", ""), marker.get("input"))
        if key and marker.get("fingerprint") == fingerprint and shard_id not in current:
            old.setdefault(key, []).append(marker)
    moved = {}
    for shard in todo:
        key = content_key(shard.shown, inputs.get(shard.url))
        if shard.shard_id not in markers and key in old and len(old[key]) == 1:
            moved[shard] = old.pop(key)[0]
    return moved


def move_labels(layout: OutputLayout, shard: Shard, marker: dict, identity: Optional[dict]) -> dict:
    """Rewrite the old shard's labels under ``shard``'s id and URL, then remove the old files
    (new Parquet, new marker, old marker, old Parquet: a crash leaves at worst both, never neither)."""
    old_id, new_id = marker["shard_id"], shard.shard_id
    with layout.labels_file(old_id).open("rb") as handle:
        table = pq.read_table(handle)
    ids = [new_id + sample_id[len(old_id):] for sample_id in table.column("sample_id").to_pylist()]
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids, pa.string()))
    table = table.set_column(table.schema.get_field_index("shard"), "shard",
                             pa.array([shard.shown] * table.num_rows, pa.string()))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    layout.labels_file(new_id).write_bytes_atomic(buffer.getvalue())
    moved = {**marker, "shard": shard.shown, "shard_id": new_id, "parquet": f"labels/{new_id}.parquet",
             "parquet_bytes": len(buffer.getvalue()), "input": identity, "moved_from": marker["shard"]}
    write_json(layout.marker_file(new_id), moved)
    layout.failed_file(new_id).remove()
    layout.marker_file(old_id).remove()
    layout.labels_file(old_id).remove()
    return moved
