"""Run an export: one Ray task per labels shard (fractional CPUs), resumable, then a merge step.

A shard is exported once its files and then its done marker are written; a rerun skips shards
whose marker carries the same export options and the same labels (the labels marker's
``finished_at``), so relabelled shards are exported again and nothing else is.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import ModuleType
import ray
from tqdm import tqdm

from pipeline.export import coco, semantic, yolo
from pipeline.export.common import ExportOptions, ShardContext, done_file, image_file, split_of, write_image
from pipeline.store.labelset import LabelSet, fetch_images, sample_uid
from pipeline.store.layout import write_json
from pipeline.io.storage import Location

log = logging.getLogger(__name__)

WRITERS: dict[str, ModuleType] = {"coco": coco, "semantic": semantic, "yolo-seg": yolo}


@dataclass
class ExportSummary:
    dest: str
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    images: int = 0
    error_rows: int = 0
    annotations: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"gemlabel export -> {self.dest}",
                 f"  shards: {self.shards_done} exported, {self.shards_skipped} already done, {self.shards_failed} failed",
                 f"  images: {self.images} ({self.error_rows} error rows left out), annotations: {self.annotations}, "
                 f"{self.seconds:.1f}s"]
        lines += [f"  wrote {url}" for url in self.files]
        lines += [f"  FAILED {shard}: {error}" for shard, error in self.failed.items()]
        return "\n".join(lines)


def _done_record(labelset: LabelSet, shard_id: str, options: ExportOptions) -> dict:
    return {"shard_id": shard_id, "options": options.key_hash(),
            "labels_finished_at": labelset.markers[shard_id].get("finished_at")}


def export_shard(labelset: LabelSet, shard_id: str, options: ExportOptions) -> dict:
    """Export one labels shard and commit it (files, then the done marker); returns its counts."""
    writer = WRITERS[options.format]
    split = split_of(labelset.markers[shard_id]["shard"], options.splits)
    rows = labelset.rows(shard_id)
    ok_rows = [row for row in rows if row["status"] == "ok"]
    ctx = ShardContext(labelset, shard_id, split, options)
    counts = writer.export_shard(ctx, ok_rows)
    if options.images and ok_rows:
        folder = writer.image_folder(split)
        by_uid = {sample_uid(row): row for row in ok_rows}
        found = 0
        for uid, image in fetch_images(labelset.root.at(ok_rows[0]["shard"]), by_uid):
            write_image(options.dest.child(*folder, image_file(by_uid[uid]["sample_id"], options)), image, options)
            found += 1
        if found != len(ok_rows):
            raise RuntimeError(f"{ok_rows[0]['shard']}: {len(ok_rows) - found} labelled images not found in the shard")
    record = {**_done_record(labelset, shard_id, options), **counts, "split": split, "images": len(ok_rows),
              "error_rows": len(rows) - len(ok_rows), "worker": {"host": socket.gethostname(), "pid": os.getpid()},
              "finished_at": datetime.now(timezone.utc).isoformat()}
    write_json(done_file(options.dest, shard_id), record)
    return record


@ray.remote
def _export_task(labelset: LabelSet, shard_id: str, options: ExportOptions) -> dict:
    return export_shard(labelset, shard_id, options)


def read_done(labelset: LabelSet, options: ExportOptions) -> dict[str, dict]:
    """shard_id -> done marker, for the shards already exported with these options and labels."""
    done = {}
    for file in options.dest.child("_done").list_files(".json"):
        record = json.loads(file.read_bytes())
        shard_id = record["shard_id"]
        if shard_id in labelset.markers and record == {**record, **_done_record(labelset, shard_id, options)}:
            done[shard_id] = record
    return done


def run_export(labelset: LabelSet, options: ExportOptions, progress: bool = True) -> ExportSummary:
    """Export every done labels shard not yet exported, in parallel on the current Ray cluster."""
    options.check(len(labelset.class_names))
    start = time.perf_counter()
    summary = ExportSummary(options.dest.url)
    write_json(options.dest.child("_export.json"), {"options": options.key(), "labels": labelset.root.url,
                                                    "labels_fingerprint": labelset.fingerprint})
    done = read_done(labelset, options)
    todo = [s for s in labelset.shard_ids() if s not in done]
    summary.shards_skipped = len(done)
    task = _export_task.options(num_cpus=options.cpus_per_task)
    shared = ray.put(labelset) if todo else None  # once in the object store, not once per task
    pending = {task.remote(shared, shard_id, options): shard_id for shard_id in todo}
    bar = tqdm(total=len(todo), unit="shard", desc="export", disable=not progress)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard_id = pending.pop(ready[0])
        try:
            done[shard_id] = ray.get(ready[0])
            summary.shards_done += 1
        except Exception as err:  # this shard only; a rerun retries it
            summary.shards_failed += 1
            summary.failed[shard_id] = str(err).strip().splitlines()[-1]
            log.warning("export of %s failed: %s", shard_id, summary.failed[shard_id])
        bar.update(1)
    bar.close()
    for record in done.values():
        summary.images += record["images"]
        summary.error_rows += record["error_rows"]
        summary.annotations += record["annotations"]
    splits = {record["split"] for record in done.values()}
    summary.files = WRITERS[options.format].finish(labelset, sorted(done), options, splits)
    summary.seconds = time.perf_counter() - start
    return summary


def default_dest(output: Location, fmt: str) -> Location:
    return output.at(output.url.rstrip("/")).child("_exports", fmt)  # "_": readers of OUT as one table skip it
