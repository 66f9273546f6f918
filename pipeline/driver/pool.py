"""The worker pool: Ray actors running ``ShardLabeler``, started (each loads the model once),
sharing one encoded vocabulary through the object store, and replaced when they die."""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.config.sizing import sizing_for
from pipeline.io.redact import redact_text
from pipeline.worker.labeler import RunSpec, ShardLabeler
from pipeline.driver.records import RunSummary

log = logging.getLogger(__name__)


WORKER_PREFIX = "gemlabel-worker"


class WorkerStartError(RuntimeError):
    """The workers could not load the model (weights, model name, device)."""


class WorkersLostError(RuntimeError):
    """More workers died than max_actor_restarts allows: the cluster itself is failing."""


class WorkerPool:
    """Ray actors running ShardLabeler, replaced when they die."""

    def __init__(self, spec: RunSpec, run_id: str):
        self.spec, self.config, self.run_id = spec, spec.config, run_id
        config = spec.config
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
        # device: cuda asks for GPU actors even before an autoscaler has started GPU nodes.
        use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0 and config.gpus_per_worker > 0)
        if use_gpu:
            self.size = config.num_workers or max(1, int(gpus // config.gpus_per_worker))
        else:
            self.size = config.num_workers or 1
        self.sizing = sizing_for(config, cpus, gpus, use_gpu, self.size)  # defaults from CPUs per GPU
        self.resources = {"num_gpus": config.gpus_per_worker if use_gpu else 0,
                          "num_cpus": self.sizing.cpus_per_worker}
        self.torch_threads = self.sizing.torch_threads
        self._remote = ray.remote(ShardLabeler)
        self._actors: list = []
        self._vocabulary = None  # ObjectRef of the encoded vocabulary, once one worker has it

    def new_actor(self):
        name = f"{WORKER_PREFIX}-{self.run_id}-{len(self._actors)}"
        actor = self._remote.options(name=name, max_restarts=0, max_concurrency=self.config.shards_per_worker,
                                     **self.resources).remote(
            self.spec, None, self.torch_threads, self._vocabulary, self.sizing, self.run_id)
        self._actors.append(actor)
        return actor

    def text_encodes(self) -> int:
        """How many times the live workers ran the text tower."""
        counts = []
        for actor in self._actors:
            try:
                counts.append(ray.get(actor.describe.remote(), timeout=30)["text_encodes"])
            except Exception:  # killed or dead actors: their count is gone with them
                pass
        return sum(counts)

    def shutdown(self) -> None:
        """Free the workers' resources (a driver that stays connected to Ray would keep them)."""
        for actor in self._actors:
            ray.kill(actor)

    def start(self, summary: "RunSummary", out=None) -> list:
        """Start the workers and wait until each has loaded the model. The same error from an
        actor's constructor is a model problem (WorkerStartError, exit 2); an actor that died
        while loading (killed, OOM, node lost) is replaced, counting against max_actor_restarts.
        Each phase (loading, the text embeddings) is said on ``out`` as it starts and ends."""
        config, began = self.config, time.perf_counter()
        say(out, f"starting {self.size} worker(s); each loads model {config.model} "
                 f"(pretrained: {config.pretrained})")
        pending = {actor.describe.remote(): actor for actor in (self.new_actor() for _ in range(self.size))}
        started = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except RayActorError as err:
                if err.actor_init_failed:
                    raise WorkerStartError(f"workers could not start: {ray_error_text(err)}") from None
                ray.kill(actor)
                summary.actor_restarts += 1
                if summary.actor_restarts > self.config.max_actor_restarts:
                    raise WorkersLostError(f"{summary.actor_restarts} workers died while loading the model "
                                           f"(max_actor_restarts={self.config.max_actor_restarts}); last: "
                                           f"{ray_error_text(err)}") from None
                log.warning("a worker died while loading the model (%s); starting another", ray_error_text(err))
                replacement = self.new_actor()
                pending[replacement.describe.remote()] = replacement
                continue
            started.append(actor)
        say(out, f"{len(started)} worker(s) loaded the model in {time.perf_counter() - began:.1f}s")
        began = time.perf_counter()
        prompts = (len(self.spec.class_names) + len(config.background)) * len(self.spec.templates)
        say(out, f"text embeddings: {prompts} prompts ({len(self.spec.class_names) + len(config.background)} "
                 f"names x {len(self.spec.templates)} templates), from the output's cache or encoded on one worker")
        self._share_vocabulary(started)
        source = ray.get(started[0].describe.remote()).get("text_source")
        say(out, "text embeddings read from the cache (no prompts encoded)" if source == "cache" else
            f"text embeddings: {prompts} prompts encoded in {time.perf_counter() - began:.1f}s")
        return started

    def _share_vocabulary(self, actors: list) -> None:
        """One worker encodes the vocabulary (or reads OUT/_cache); the others get it (embeddings
        of every class name, synonym and background name) through the object store, as do
        replacement workers (new_actor), so a run runs the text tower at most once."""
        try:
            # Re-put by the driver: a copy held only by the first worker's node would be lost with
            # that node, and replacement workers could not start.
            self._vocabulary = ray.put(ray.get(actors[0].shared_vocabulary.remote()))
            ray.get([a.set_vocabulary.remote(self._vocabulary) for a in actors[1:]])
        except (RayActorError, RayTaskError) as err:
            cause = getattr(err, "cause", None) or err
            raise WorkerStartError(f"workers could not start: {ray_error_text(cause)}") from None


def say(out, text: str) -> None:
    if out is not None:
        print(f"gemlabel: {text}", file=out, flush=True)


def ray_error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    text = redact_text(str(cause if cause is not None else err)).strip().splitlines()
    return text[-1] if text else type(err).__name__
