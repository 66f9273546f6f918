"""The driver: decide which shards to label, hand them to Ray actors, survive failures, report.

Each actor takes one shard at a time. A shard whose read fails is retried (up to
``max_shard_retries`` more times) and then recorded as failed; a shard whose actor dies is put
back in the queue and a replacement actor is started. Other shards go on in both cases.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from gem.loading import WeightsUnavailableError, check_weights_available
from gem.templates import clean_class_names, resolve_templates
from pipeline.config import ConfigError, LabelConfig, fingerprint
from pipeline.manifest import OutputLayout, prepare_output, read_markers, write_json
from pipeline.shards import Shard, list_shards
from pipeline.storage import join, read_bytes
from pipeline.worker import RunSpec, ShardLabeler, register_model_config

log = logging.getLogger(__name__)

NAMESPACE = "gemlabel"
WORKER_PREFIX = "gemlabel-worker"


@dataclass
class RunSummary:
    run_id: str
    output: str
    started_at: str
    finished_at: str = ""
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    images: int = 0
    image_errors: int = 0
    labels: int = 0
    seconds: float = 0.0
    actor_restarts: int = 0
    shard_retries: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> last error

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_record(self) -> dict:
        return {**self.__dict__, "images_per_s": round(self.images_per_s, 3)}

    def text(self) -> str:
        lines = [f"gemlabel run {self.run_id} -> {self.output}",
                 f"  shards: {self.shards_total} total, {self.shards_done} labelled, "
                 f"{self.shards_skipped} already done, {self.shards_failed} failed",
                 f"  images: {self.images} ({self.image_errors} errors), labels: {self.labels}, "
                 f"{self.images_per_s:.2f} images/s over {self.seconds:.1f}s",
                 f"  actor restarts: {self.actor_restarts}, shard retries: {self.shard_retries}"]
        lines += [f"  FAILED {url}: {error}" for url, error in self.failed.items()]
        return "\n".join(lines)


def resolve_vocabulary(config: LabelConfig) -> list:
    """The classes, each a name or a list of synonyms (the first name is the label). Vocab files:
    one class a line, commas between synonyms; YAML: a list item that is a list holds synonyms,
    a string item may list several classes separated by commas."""
    if config.vocab_file:
        text = read_bytes(config.vocab_file, config.storage_options).decode("utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        entries = [[name.strip() for name in line.split(",")] for line in lines]
    else:
        entries = []
        for item in config.vocab:
            if isinstance(item, list):
                entries.append([name.strip() for name in item])
            else:
                entries += [[name.strip()] for name in item.split(",")]
    try:
        clean_class_names([name for entry in entries for name in entry] + list(config.background))
    except ValueError as err:
        raise ConfigError(f"vocab: {err}") from None
    return [entry[0] if len(entry) == 1 else entry for entry in entries]


def check_model(config: LabelConfig) -> None:
    """Model name and weights, checked in the driver before any worker starts."""
    register_model_config(config.model_config)
    try:
        check_weights_available(config.model, config.pretrained)
    except (ValueError, WeightsUnavailableError) as err:  # UnsupportedModelError is a ValueError
        raise ConfigError(f"model: {err}") from None


def build_spec(config: LabelConfig) -> RunSpec:
    class_names = resolve_vocabulary(config)
    try:
        templates = list(resolve_templates(config.templates))
    except ValueError as err:
        raise ConfigError(f"templates: {err}") from None
    return RunSpec(config, class_names, templates, fingerprint(config.fingerprint_source(class_names, templates)))


def select_shards(shards: list[Shard], markers: dict[str, dict], spec: RunSpec) -> list[Shard]:
    """Shards still to label: not done (or done under another fingerprint), or with failed
    samples when retry_failed is set."""
    todo = []
    for shard in shards:
        marker = markers.get(shard.shard_id)
        done = marker is not None and marker.get("fingerprint") == spec.fingerprint
        if spec.config.overwrite or not done or (spec.config.retry_failed and marker.get("errors", 0) > 0):
            todo.append(shard)
    return todo


def connect_ray(config: LabelConfig) -> None:
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"namespace": NAMESPACE, "log_to_driver": True}
    if not address:  # start a local cluster: no dashboard needed
        kwargs["include_dashboard"] = False
    ray.init(address=address, **kwargs)


class WorkerStartError(RuntimeError):
    """The workers could not load the model (weights, model name, device)."""


class WorkersLostError(RuntimeError):
    """More workers died than max_actor_restarts allows: the cluster itself is failing."""


class WorkerPool:
    """Ray actors running ShardLabeler, replaced when they die."""

    def __init__(self, spec: RunSpec, run_id: str):
        self.spec, self.config, self.run_id = spec, spec.config, run_id
        config = spec.config
        gpus = ray.cluster_resources().get("GPU", 0)
        # device: cuda asks for GPU actors even before an autoscaler has started GPU nodes.
        use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0 and config.gpus_per_worker > 0)
        if use_gpu:
            self.resources = {"num_gpus": config.gpus_per_worker, "num_cpus": config.cpus_per_worker}
            self.size = config.num_workers or max(1, int(gpus // config.gpus_per_worker))
        else:
            self.resources = {"num_gpus": 0, "num_cpus": config.cpus_per_worker}
            self.size = config.num_workers or 1
        self.torch_threads = max(1, int(round(config.cpus_per_worker)))
        self._remote = ray.remote(ShardLabeler)
        self._actors: list = []

    def new_actor(self):
        name = f"{WORKER_PREFIX}-{self.run_id}-{len(self._actors)}"
        actor = self._remote.options(name=name, max_restarts=0, **self.resources).remote(
            self.spec, None, self.torch_threads)
        self._actors.append(actor)
        return actor

    def shutdown(self) -> None:
        """Free the workers' resources (a driver that stays connected to Ray would keep them)."""
        for actor in self._actors:
            ray.kill(actor)

    def start(self) -> list:
        actors = [self.new_actor() for _ in range(self.size)]
        try:  # surface model-loading errors (weights, config) once, before any shard is handed out
            ray.get([a.describe.remote() for a in actors])
        except RayActorError as err:
            cause = getattr(err, "cause", None) or err
            raise WorkerStartError(f"workers could not start: {_error_text(cause)}") from None
        return actors


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    text = str(cause if cause is not None else err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def label_shards(pool: WorkerPool, actors: list, todo: Iterable[Shard], summary: RunSummary,
                 on_result: Callable[[Shard, Optional[dict]], None]) -> None:
    """Dispatch shards to the started actors until each is done or has failed for good."""
    config = pool.config
    queue: deque[Shard] = deque(todo)
    attempts: Counter = Counter()
    idle = list(actors)
    inflight: dict = {}
    while queue or inflight:
        while queue and idle:
            actor, shard = idle.pop(), queue.popleft()
            inflight[actor.label_shard.remote(shard, attempts[shard])] = (actor, shard)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, shard = inflight.pop(ready[0])
        try:
            marker = ray.get(ready[0])
        except RayActorError as err:  # the actor died (killed, OOM, node lost): redo the shard elsewhere
            ray.kill(actor)  # merely unreachable actors too, so no two workers label one shard
            summary.actor_restarts += 1
            if summary.actor_restarts > config.max_actor_restarts:
                raise WorkersLostError(f"{summary.actor_restarts} workers died (max_actor_restarts="
                                   f"{config.max_actor_restarts}); last: {_error_text(err)}") from None
            log.warning("worker died while labelling %s (%s); retrying elsewhere", shard.url, _error_text(err))
            attempts[shard] += 1
            _retry_or_fail(shard, attempts, queue, summary, _error_text(err), config, on_result)
            idle.append(pool.new_actor())
            continue
        except RayTaskError as err:  # the shard could not be read
            attempts[shard] += 1
            _retry_or_fail(shard, attempts, queue, summary, _error_text(err), config, on_result)
            idle.append(actor)
            continue
        idle.append(actor)
        summary.shards_done += 1
        summary.images += marker["samples"]
        summary.image_errors += marker["errors"]
        summary.labels += marker["labels"]
        on_result(shard, marker)


def _retry_or_fail(shard: Shard, attempts: Counter, queue: deque, summary: RunSummary, error: str,
                   config: LabelConfig, on_result: Callable) -> None:
    if attempts[shard] <= config.max_shard_retries:
        summary.shard_retries += 1
        queue.append(shard)
        return
    summary.shards_failed += 1
    summary.failed[shard.url] = error
    write_json(OutputLayout(config.output).failed_url(shard.shard_id),
               {"shard": shard.url, "shard_id": shard.shard_id, "error": error, "attempts": attempts[shard],
                "failed_at": datetime.now(timezone.utc).isoformat()}, config.storage_options)
    on_result(shard, None)


def run_labeling(config: LabelConfig, out=None) -> RunSummary:
    """Label every shard of the input not yet done in the output; progress and the summary go to
    ``out`` (default stderr). Raises ConfigError on a bad vocabulary, templates or an output made
    with other settings."""
    out = out or sys.stderr
    started = datetime.now(timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    spec = build_spec(config)
    layout = OutputLayout(config.output)
    try:
        shards = list_shards(config.input, config.storage_options)
    except (ValueError, OSError) as err:
        raise ConfigError(f"input: {err}") from None
    if not shards:
        raise ConfigError("input: no shards found")
    check_model(config)
    prepare_output(layout, spec.fingerprint, config.fingerprint_source(spec.class_names, spec.templates),
                   config.overwrite, config.storage_options)
    todo = select_shards(shards, read_markers(layout, config.storage_options), spec)
    summary = RunSummary(run_id, config.output, started.isoformat(), shards_total=len(shards),
                         shards_skipped=len(shards) - len(todo))
    wall = time.perf_counter()
    try:
        if todo:
            connect_ray(config)
            pool = WorkerPool(spec, run_id)
            try:
                _label_with_progress(pool, todo, summary, wall, len(shards), config, out)
            finally:
                pool.shutdown()
    finally:
        summary.seconds = time.perf_counter() - wall
        summary.finished_at = datetime.now(timezone.utc).isoformat()
        write_json(join(layout.runs_dir, f"{run_id}.json"), summary.as_record(), config.storage_options)
    print(summary.text(), file=out, flush=True)
    return summary


def _label_with_progress(pool: WorkerPool, todo: list[Shard], summary: RunSummary, wall: float, total: int,
                         config: LabelConfig, out) -> None:
    actors = pool.start()
    print(f"gemlabel: {len(todo)} of {total} shards to label with {pool.size} worker(s) "
          f"({pool.resources}); {summary.shards_skipped} already done", file=out, flush=True)
    with tqdm(total=len(todo), unit="shard", file=out, disable=not config.progress, dynamic_ncols=True) as bar:
        def on_result(shard: Shard, marker: Optional[dict]) -> None:
            elapsed = time.perf_counter() - wall
            bar.set_postfix(images=summary.images, img_s=f"{summary.images / max(elapsed, 1e-9):.2f}",
                            failed_shards=summary.shards_failed, bad_images=summary.image_errors)
            bar.update(1)
            if not config.progress:
                state = "failed" if marker is None else f"{marker['samples']} images, {marker['errors']} errors"
                print(f"gemlabel: {shard.shard_id}: {state}", file=out, flush=True)
        label_shards(pool, actors, todo, summary, on_result)
