"""Run an export: one task per labels shard, resumable, then a merge step.

The per-shard work (``export_shard``) is the same wherever it runs: in Ray tasks (fractional CPUs)
when the export is asked to use a cluster, else in local processes (``concurrent.futures``), which
start in a second instead of a Ray cluster's tens of seconds.

A shard is exported once its files and then its done marker are written; a rerun skips shards
whose marker carries the same export options and the same labels (the labels marker's
``finished_at``), so relabelled shards are exported again and nothing else is. The folder holds
one export only (``pipeline.export.folder``).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import ModuleType
from typing import Optional

from tqdm import tqdm

from pipeline.export import coco, semantic, yolo
from pipeline.export import folder
from pipeline.export.common import (ExportOptions, ShardContext, assign_splits, done_file, image_file,
                                    write_image)
from pipeline.store.labelset import InputChangedError, LabelSet, fetch_images, sample_uid
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
    merge_failed: Optional[str] = None   # the merge step's error (its files are not written)

    def text(self) -> str:
        lines = [f"gemlabel export -> {self.dest}",
                 f"  shards: {self.shards_done} exported, {self.shards_skipped} already done, {self.shards_failed} failed",
                 f"  images: {self.images} ({self.error_rows} error rows left out), annotations: {self.annotations}, "
                 f"{self.seconds:.1f}s"]
        lines += [f"  wrote {url}" for url in self.files]
        lines += [f"  FAILED {shard}: {error}" for shard, error in self.failed.items()]
        if self.merge_failed:
            lines.append(f"  FAILED merge step (rerun the same command): {self.merge_failed}")
        return "\n".join(lines)


def _done_record(labelset: LabelSet, shard_id: str, options: ExportOptions) -> dict:
    return {"shard_id": shard_id, "options": options.key_hash(),
            "labels_finished_at": labelset.markers[shard_id].get("finished_at")}


def export_shard(labelset: LabelSet, shard_id: str, options: ExportOptions, split: str = "train") -> dict:
    """Export one labels shard and commit it (files, then the done marker); returns its counts.
    With images, the input shard must still be the file that was labelled."""
    writer = WRITERS[options.format]
    rows = labelset.rows(shard_id)
    ok_rows = [row for row in rows if row["status"] == "ok"]
    ctx = ShardContext(labelset, shard_id, split, options)
    source = labelset.input_shard(shard_id) if options.images and ok_rows else None
    counts = writer.export_shard(ctx, ok_rows)
    if source is not None:
        folder_parts = writer.image_folder(split)
        by_uid = {sample_uid(row): row for row in ok_rows}
        found = 0
        for uid, image in fetch_images(source, by_uid):
            row = by_uid[uid]
            if image.size != (row["width"], row["height"]):  # a changed shard whose identity was not recorded
                raise InputChangedError(f"{source}: image {uid} is {image.width}x{image.height} but was labelled at "
                                        f"{row['width']}x{row['height']}; relabel the shard (rerun gemlabel label)")
            write_image(ctx.out(*folder_parts, image_file(by_uid[uid]["sample_id"], options)), image, options)
            found += 1
        if found != len(ok_rows):
            raise RuntimeError(f"{source}: {len(ok_rows) - found} labelled images not found in the shard")
    record = {**_done_record(labelset, shard_id, options), **counts, "split": split, "images": len(ok_rows),
              "error_rows": len(rows) - len(ok_rows), "files": ctx.written,
              "worker": {"host": socket.gethostname(), "pid": os.getpid()},
              "finished_at": datetime.now(timezone.utc).isoformat()}
    write_json(done_file(options.dest, shard_id), record)
    return record


def _ray_task():
    import ray

    @ray.remote
    def export_task(labelset: LabelSet, shard_id: str, options: ExportOptions, split: str) -> dict:
        return export_shard(labelset, shard_id, options, split)
    return export_task


_LOCAL: dict = {}  # a local worker process's labelset, sent once when the process starts


def _local_init(labelset: LabelSet) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it lets running shards finish
    _LOCAL["labelset"] = labelset


def _local_task(shard_id: str, options: ExportOptions, split: str) -> dict:
    return export_shard(_LOCAL["labelset"], shard_id, options, split)


def failure_text(err: BaseException) -> str:
    """One line for a failed shard: the task's own exception, not Ray's wrapper."""
    cause = getattr(err, "cause", None) or err
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def _identity(labelset: LabelSet, options: ExportOptions) -> dict:
    return {"options": options.key(), "labels": labelset.root.url, "labels_fingerprint": labelset.fingerprint}


def read_done(labelset: LabelSet, options: ExportOptions) -> dict[str, dict]:
    """shard_id -> done marker, for the shards already exported with these options and labels;
    the files of every other marker (shards no longer in the labels, relabelled ones) are removed."""
    done = {}
    for file, record in folder.read_done_markers(options.dest):
        shard_id = record["shard_id"]
        if shard_id in labelset.markers and file.url == done_file(options.dest, shard_id).url \
                and record == {**record, **_done_record(labelset, shard_id, options)}:
            done[shard_id] = record
        else:
            folder.drop_shard(options.dest, record, file)
    return done


def _run_tasks(labelset: LabelSet, options: ExportOptions, todo: dict[str, str], use_ray: bool):
    """Yield (shard_id, record or exception) as the shards' tasks end."""
    if use_ray:
        import ray
        task = _ray_task().options(num_cpus=options.cpus_per_task)
        shared = ray.put(labelset)  # once in the object store, not once per task
        pending = {task.remote(shared, shard_id, options, split): shard_id for shard_id, split in todo.items()}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                shard_id = pending.pop(ready[0])
                try:
                    yield shard_id, ray.get(ready[0])
                except Exception as err:
                    yield shard_id, err
        finally:
            for ref in pending:  # interrupted: not started shards are not done; a rerun does them
                ray.cancel(ref)
        return
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    if workers == 1:  # one shard or one core: here, no process to start
        for shard_id, split in todo.items():
            try:
                yield shard_id, export_shard(labelset, shard_id, options, split)
            except Exception as err:
                yield shard_id, err
        return
    context = multiprocessing.get_context("forkserver")  # not fork: this process may hold threads (fsspec, tqdm)
    context.set_forkserver_preload(["pipeline.export.runner", "pipeline.store.labelset", "gem.preprocess"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_local_init, initargs=(labelset,))
    futures: dict[Future, str] = {pool.submit(_local_task, shard_id, options, split): shard_id
                                  for shard_id, split in todo.items()}
    try:
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for future in finished:
                shard_id = futures.pop(future)
                error = future.exception()
                yield shard_id, error if error is not None else future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # running shards finish (all their files, or none)


def run_export(labelset: LabelSet, options: ExportOptions, progress: bool = True,
               use_ray: Optional[bool] = None) -> ExportSummary:
    """Export every done labels shard not yet exported, in parallel: on the current Ray cluster
    when ``use_ray`` (default: when Ray is initialised), else in local processes."""
    options = options.resolved(labelset)
    options.check(len(labelset.class_names))
    splits = assign_splits(labelset, options.splits)
    if use_ray is None:
        import ray
        use_ray = ray.is_initialized()
    start = time.perf_counter()
    summary = ExportSummary(options.dest.url)
    identity = _identity(labelset, options)
    previous_files = folder.claim(options.dest, identity)
    done = read_done(labelset, options)
    todo = {s: splits[s] for s in labelset.shard_ids() if s not in done}
    summary.shards_skipped = len(done)
    bar = tqdm(total=len(todo), unit="shard", desc="export", disable=not progress)
    if todo:
        for shard_id, result in _run_tasks(labelset, options, todo, use_ray):
            if isinstance(result, BaseException):  # this shard only; a rerun retries it
                summary.shards_failed += 1
                summary.failed[shard_id] = failure_text(result)
                log.warning("export of %s failed: %s", shard_id, summary.failed[shard_id])
            else:
                done[shard_id] = result
                summary.shards_done += 1
            bar.update(1)
    bar.close()
    for record in done.values():
        summary.images += record["images"]
        summary.error_rows += record["error_rows"]
        summary.annotations += record["annotations"]
    present = {record["split"] for record in done.values()}
    try:
        summary.files = WRITERS[options.format].finish(labelset, sorted(done), options, present)
        folder.finish_claim(options.dest, identity, previous_files, summary.files)
    except Exception as err:  # storage failing (an outage, a full disk): a rerun merges again
        summary.merge_failed = failure_text(err)
        log.warning("export merge step failed: %s", summary.merge_failed)
    summary.seconds = time.perf_counter() - start
    return summary


def default_dest(output: Location, fmt: str) -> Location:
    return output.at(output.url.rstrip("/")).child("_exports", fmt)  # "_": readers of OUT as one table skip it
