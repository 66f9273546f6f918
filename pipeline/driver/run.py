"""One labelling run: plan it, claim the output, start the workers, hand them the shards, record it.

Nothing is claimed before the plan holds (vocabulary, templates, model, storage options, shards,
workers the cluster can schedule): a bad run stops with one ``ConfigError`` line and writes nothing.
"""
from __future__ import annotations

import logging
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

from tqdm import tqdm

from pipeline.config import ConfigError, LabelConfig
from pipeline.store.layout import (OutputLayout, check_output_claim, claimed_settings, prepare_output, read_markers,
                                   verify_markers)
from pipeline.driver.resolve import resolve_paths
from pipeline.io.shards import Shard, list_shards
from pipeline.io.redact import redact_url
from pipeline.io.storage import file_identity, stat_files
from pipeline.config.errors import first_line
from pipeline.driver.cluster import connect_ray, ensure_schedulable
from pipeline.driver.dispatch import label_shards
from pipeline.driver.plan import build_spec, check_model, check_output_location, check_storage_options, select_shards, with_read_timeout
from pipeline.driver.pool import WorkerPool
from pipeline.driver.records import RunInterrupted, RunSummary, record_run
from pipeline.driver.signals import stop_on_sigterm
from pipeline.worker.progress import clear_progress, images_in_flight
from pipeline.driver.moved import content_key, find_moved, move_labels

log = logging.getLogger(__name__)


STALE_TEMP_S = 3600.0  # a temp file untouched this long belongs to no live writer (another run may share the output)


def run_labeling(config: LabelConfig, out=None, summary_out=None) -> RunSummary:
    """Label every shard of the input not yet done in the output; progress goes to ``out``
    (default stderr), the summary to ``summary_out`` (default stdout). Raises ConfigError on a
    bad vocabulary, templates, model, an output made with other settings, or workers the cluster
    can never schedule -- all before the output is claimed."""
    out = out or sys.stderr
    stop_on_sigterm()
    started = datetime.now(timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    config = with_read_timeout(resolve_paths(config))
    check_output_location(config.output)
    layout = OutputLayout(config.location(config.output))
    spec = build_spec(config, claimed_settings(layout))
    check_storage_options(config)
    check_output_claim(layout, spec.fingerprint, spec.source, config.overwrite)  # before Ray starts
    try:
        shards = list_shards([config.location(pattern) for pattern in config.input])
    except (ValueError, OSError) as err:
        raise ConfigError(f"input: {first_line(err)}") from None
    except Exception as err:  # e.g. botocore's NoCredentialsError
        raise ConfigError(f"input: cannot list {', '.join(map(redact_url, config.input))}: "
                          f"{first_line(err)}") from None
    if not shards:
        raise ConfigError("input: no shards found")
    check_model(config)
    markers, unreadable = verify_markers(layout, read_markers(layout))
    for shard_id, why in sorted(unreadable.items()):
        log.warning("relabelling %s: %s", shard_id, why)
    inputs = {url: file_identity(info) for url, info in
              stat_files([config.location(s.url) for s in shards]).items()}
    todo = select_shards(shards, markers, spec, inputs)
    moved = {} if config.overwrite else find_moved(shards, todo, markers, inputs, spec.fingerprint)
    todo = [shard for shard in todo if shard not in moved]
    summary = RunSummary(run_id, config.output, started.isoformat(), shards_total=len(shards),
                         shards_skipped=len(shards) - len(todo), shards_moved=len(moved))
    pool = None
    if todo:  # the workers must fit the cluster before the output is claimed
        connect_ray(config)
        stop_on_sigterm()  # ray.init made SIGTERM a sys.exit
        pool = WorkerPool(spec, run_id)
        ensure_schedulable(pool, out)
    prepare_output(layout, spec.fingerprint, spec.source, config.overwrite, run_id)
    for shard, marker in moved.items():
        try:
            move_labels(layout, shard, marker, inputs.get(shard.url))
        except Exception as err:  # the output's storage failing: the shard is not done, a rerun retries
            summary.shards_moved -= 1
            summary.shards_skipped -= 1
            summary.shards_failed += 1
            summary.failed[shard.shown] = f"could not move the labels of {marker['shard']}: {first_line(err)}"
            continue
        print(f"gemlabel: {shard.shown} is {marker['shard']} moved (same name, size and "
              f"{content_key(shard.shown, inputs.get(shard.url))[2]}): its labels moved with it, not labelled "
              "again", file=out, flush=True)
    stale = layout.remove_stale_temps(time.time() - STALE_TEMP_S)
    if stale:
        log.info("removed %d temp file(s) that writers killed mid-write left over an hour ago", stale)
    wall = time.perf_counter()
    try:
        if pool is not None:
            _label_with_progress(pool, todo, summary, len(shards), config, out)
            summary.text_encodes = pool.text_encodes()
        summary.status = "failed" if summary.shards_failed else "ok"
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise RunInterrupted(summary) from None
    except BaseException as err:
        summary.status, summary.error = "error", first_line(err)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        summary.seconds = time.perf_counter() - wall
        summary.finished_at = datetime.now(timezone.utc).isoformat()
        record_run(layout.run_file(run_id), summary, out)
    print(summary.text(), file=summary_out or sys.stdout, flush=True)
    return summary


def _label_with_progress(pool: WorkerPool, todo: list[Shard], summary: RunSummary, total: int,
                         config: LabelConfig, out) -> None:
    """The bar counts images (those of finished shards and those done so far in shards in flight,
    which workers publish: ``pipeline.worker.progress``), its rate images/s, shards beside them."""
    actors = pool.start(summary, out)
    print(f"gemlabel: {len(todo)} of {total} shards to label with {pool.size} worker(s) "
          f"({pool.resources}); {summary.shards_skipped} already done", file=out, flush=True)
    finished: set[str] = set()
    with tqdm(total=None, unit="img", file=out, disable=not config.progress, dynamic_ncols=True) as bar:
        def show() -> None:
            images = summary.images + images_in_flight(pool.run_id, finished)
            bar.set_postfix_str(f"shards={summary.shards_done + summary.shards_failed}/{len(todo)}, "
                                f"failed_shards={summary.shards_failed}, bad_images={summary.image_errors}",
                                refresh=False)
            bar.update(max(0, images - bar.n))

        def on_result(shard: Shard, marker: Optional[dict]) -> None:
            finished.add(shard.shard_id)
            show()
            if not config.progress:
                state = "failed" if marker is None else f"{marker['samples']} images, {marker['errors']} errors"
                print(f"gemlabel: {shard.shard_id}: {state}", file=out, flush=True)
        try:
            label_shards(pool, actors, todo, summary, on_result, on_tick=show if config.progress else None)
        finally:
            clear_progress(pool.run_id)
