"""Handing shards to the workers until each is done or has failed for good.

Each actor holds up to ``shards_per_worker`` shards. A shard whose read fails is retried (up to
``max_shard_retries`` more times) and then recorded as failed; a shard whose actor dies is put
back in the queue and a replacement actor is started. Other shards go on in both cases.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.config import LabelConfig
from pipeline.store.layout import OutputLayout, write_json
from pipeline.io.shards import Shard
from pipeline.io.redact import redact_text
from pipeline.io.storage import protocol_of
from pipeline.config.errors import first_line
from pipeline.driver.pool import WorkerPool, WorkersLostError, ray_error_text
from pipeline.driver.records import RunSummary

log = logging.getLogger(__name__)


def label_shards(pool: WorkerPool, actors: list, todo: Iterable[Shard], summary: RunSummary,
                 on_result: Callable[[Shard, Optional[dict]], None],
                 on_tick: Optional[Callable[[], None]] = None, tick_s: float = 1.0) -> None:
    """Dispatch shards to the started actors until each is done or has failed for good. Each
    actor holds up to ``shards_per_worker`` shards (``_next_slot``). A replacement actor gets
    shards only once it has started, so when a node is lost (and its replacement cannot be placed
    yet) the surviving actors take its shards. ``on_tick`` is called about every ``tick_s``
    seconds while shards are in flight (to show images done mid-shard)."""
    config = pool.config
    queue: deque[Shard] = deque(todo)
    attempts: Counter = Counter()
    slots = config.shards_per_worker
    idle = [actor for _ in range(slots) for actor in reversed(actors)]  # free slots; actors[0] first
    inflight: dict = {}
    starting: dict = {}  # describe() call -> replacement actor not yet known to be up
    dead: set = set()  # actors already replaced: their other shards are only requeued
    suspects: set = set()  # shards whose actor died holding another one too: each is redone alone

    def free(actor) -> None:
        """A slot of the actor is free again, unless the actor has died (and been replaced) since."""
        if actor not in dead:
            idle.append(actor)

    def replace(actor, err: BaseException) -> None:
        ray.kill(actor)  # merely unreachable actors too, so no two workers label one shard
        dead.add(actor)
        idle[:] = [a for a in idle if a is not actor]
        summary.actor_restarts += 1
        if summary.actor_restarts > config.max_actor_restarts:
            raise WorkersLostError(f"{summary.actor_restarts} workers died (max_actor_restarts="
                                   f"{config.max_actor_restarts}); last: {ray_error_text(err)}") from None
        replacement = pool.new_actor()
        starting[replacement.describe.remote()] = replacement

    while queue or inflight:
        while queue and idle:
            actor = _next_slot(idle, inflight, len(queue), suspects, alone=queue[0] in suspects)
            if actor is None:
                break
            shard = queue.popleft()
            # a shard is requeued only when charged an attempt or suspected: then it is a redo, and
            # its worker clears up what the last one (killed while committing it) may have left
            redo = attempts[shard] > 0 or shard in suspects
            inflight[actor.label_shard.remote(shard, attempts[shard], redo)] = (actor, shard)
        waiting = {"timeout": tick_s} if on_tick else {}
        ready, _ = ray.wait([*inflight, *starting], num_returns=1, **waiting)
        if not ready:
            on_tick()
            continue
        if ready[0] in starting:
            actor = starting.pop(ready[0])
            try:
                ray.get(ready[0])
                idle.extend([actor] * slots)
            except RayActorError as err:
                replace(actor, err)
            continue
        actor, shard = inflight.pop(ready[0])
        try:
            marker = ray.get(ready[0])
        except RayActorError as err:  # the actor died (killed, OOM, node lost): redo the shard elsewhere
            if actor in dead or any(holder is actor for holder, _ in inflight.values()):
                # It held another shard too, and either may have killed it: neither is charged an
                # attempt; each is redone alone, so a shard that kills workers is found out alone.
                log.warning("worker died while labelling %s and another shard (%s); redoing each alone",
                            shard.shown, ray_error_text(err))
                suspects.add(shard)
                summary.shard_retries += 1
                queue.append(shard)
            else:
                log.warning("worker died while labelling %s (%s); retrying elsewhere", shard.shown, ray_error_text(err))
                attempts[shard] += 1
                _retry_or_fail(shard, attempts, queue, summary, ray_error_text(err), config, on_result)
            if actor not in dead:  # one replacement per dead actor, however many shards it held
                replace(actor, err)
            continue
        except RayTaskError as err:  # the shard could not be read
            attempts[shard] += 1
            _retry_or_fail(shard, attempts, queue, summary, ray_error_text(err), config, on_result)
            free(actor)
            continue
        free(actor)  # a shard can finish on an actor that has died (and been replaced) since
        summary.shards_done += 1
        summary.images += marker["samples"]
        summary.image_errors += marker["errors"]
        summary.labels += marker["labels"]
        on_result(shard, marker)


def _next_slot(idle: list, inflight: dict, queued: int, suspects: frozenset = frozenset(),
               alone: bool = False):
    """The free slot to give the next shard (removed from ``idle``), or None to keep it queued;
    ``queued`` shards wait, ``alone``: the next one is a suspect (its actor died holding another
    shard too, and either may have killed it).

    An actor holding no shard first (the most recently freed). Another shard for a busy actor only
    while every actor can get one, so that at the end of a run no shard waits behind another on
    one actor while a second actor has nothing to do; never for an actor running a suspect, and a
    suspect only to an actor holding nothing: a shard that kills its worker is found out alone."""
    holding = Counter(actor for actor, _ in inflight.values())
    for position in range(len(idle) - 1, -1, -1):
        if not holding[idle[position]]:
            return idle.pop(position)
    guarded = {actor for actor, shard in inflight.values() if shard in suspects}
    shared = [position for position, actor in enumerate(idle) if actor not in guarded]
    if alone or not shared or queued < len(set(idle) | set(holding)):
        return None
    return idle.pop(shared[-1])


def _retry_or_fail(shard: Shard, attempts: Counter, queue: deque, summary: RunSummary, error: str,
                   config: LabelConfig, on_result: Callable) -> None:
    if attempts[shard] <= config.max_shard_retries:
        summary.shard_retries += 1
        queue.append(shard)
        return
    summary.shards_failed += 1
    error = _shard_error(shard, error, config)
    summary.failed[shard.shown] = error
    try:  # a note for `gemlabel report`; the shard is not done either way, so a rerun redoes it
        write_json(OutputLayout(config.location(config.output)).failed_file(shard.shard_id),
                   {"shard": shard.shown, "shard_id": shard.shard_id, "error": error, "attempts": attempts[shard],
                    "failed_at": datetime.now(timezone.utc).isoformat()})
    except Exception as err:  # the output's storage is failing too (outage)
        log.warning("could not record %s as failed: %s", shard.shown, first_line(err))
    on_result(shard, None)


def _shard_error(shard: Shard, error: str, config: LabelConfig) -> str:
    """The error recorded for a shard; a read timeout says that the stream stalled, and where
    (the worker's own deadline, ``pipeline.io.guarded``, says so already)."""
    error = redact_text(error)
    if error.startswith("StalledRead: "):
        return error[len("StalledRead: "):]
    if "Timeout" in error and protocol_of(shard.url) in ("http", "https"):
        return f"stalled: no data for {config.read_timeout_s:g}s while reading {shard.shown} ({error.strip()})"
    return error
