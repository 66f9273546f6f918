"""The driver: decide which shards to label, hand them to Ray actors, survive failures, report.

Each actor takes one shard at a time. A shard whose read fails is retried (up to
``max_shard_retries`` more times) and then recorded as failed; a shard whose actor dies is put
back in the queue and a replacement actor is started. Other shards go on in both cases.
"""
from __future__ import annotations

import logging
import dataclasses
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional, Union

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from gem.loading import WeightsUnavailableError, check_checkpoint_file, check_weights_available, vision_config
from gem.templates import clean_class_names, resolve_templates
from pipeline.config import ConfigError, LabelConfig, fingerprint
from pipeline.manifest import OutputLayout, prepare_output, read_markers, verify_markers, write_json
from pipeline.resolve import content_fingerprints, resolve_paths
from pipeline.shards import Shard, list_shards
from pipeline.sizing import sizing_for
from pipeline.storage import Location, file_identity, protocol_of, same_file_version, stat_files
from pipeline.worker import RunSpec, ShardLabeler, register_model_config

log = logging.getLogger(__name__)

NAMESPACE = "gemlabel"
RECORD_WAIT_S = 120.0  # how long the end of a run waits for unreachable storage to write its record
STALE_TEMP_S = 3600.0  # a temp file untouched this long belongs to no live writer (another run may share the output)
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
    text_encodes: int = 0  # times the workers ran the text tower (0 when OUT/_cache had the embeddings)
    failed: dict[str, str] = field(default_factory=dict)  # shard url -> last error
    status: str = "running"  # ok | failed (some shards) | error (did not start or crashed) | interrupted
    error: str = ""

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


def read_vocab_file(source: Location) -> list[str]:
    """Class names from a UTF-8 file, one a line; '#' starts a comment (whole-line or inline)."""
    url = source.url
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"vocab_file: no such file {url}") from None
    except Exception as err:  # fsspec back ends raise their own kinds (aiohttp, botocore, ...)
        raise ConfigError(f"vocab_file: cannot read {url}: {_first_line(err)}") from None
    if b"\x00" in data:
        raise ConfigError(f"vocab_file: {url} looks binary; give a text file with one class name a line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"vocab_file: {url} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def resolve_vocabulary(config: LabelConfig) -> list[Union[str, list[str]]]:
    """The classes, each a name or a list of synonyms (the first name is the label). YAML: one
    class per list item, a string item never split, a list item holding synonyms (the --vocab
    flag's commas and bars were split by the CLI); vocab files: one class a line, commas between
    synonyms. Names repeated across classes, synonyms and background names are an error."""
    if config.vocab_file:
        lines = read_vocab_file(config.location(config.vocab_file))
        entries = [line.split(",") for line in lines]
    else:
        entries = [[item] if isinstance(item, str) else item for item in config.vocab]
    entries = [[name.strip() for name in entry] for entry in entries]
    try:
        clean_class_names([name for entry in entries for name in entry] + list(config.background))
    except ValueError as err:
        raise ConfigError(f"vocab: {err}") from None
    return [entry[0] if len(entry) == 1 else entry for entry in entries]


def check_model(config: LabelConfig) -> None:
    """Model name, weights, and the settings that depend on the model's architecture (GEM depth,
    input size vs patch size), checked in the driver from the model config before any worker starts."""
    register_model_config(config.model_config)
    try:
        check_weights_available(config.model, config.pretrained)
        check_checkpoint_file(config.pretrained)
    except (ValueError, WeightsUnavailableError) as err:  # UnsupportedModelError is a ValueError
        raise ConfigError(f"model: {err}") from None
    vision = vision_config(config.model)
    if not vision:
        return
    layers, patch = vision.get("layers"), vision.get("patch_size")
    if isinstance(layers, int) and config.gem.depth > layers:
        raise ConfigError(f"gem.depth: {config.model} has {layers} blocks, so depth must be at most {layers}; "
                          f"got {config.gem.depth}")
    if isinstance(patch, int):
        height, width = config.input_size
        if min(height, width) < patch or height % patch or width % patch:
            raise ConfigError(f"input_size: {config.model} uses {patch}-pixel patches, so each side must be a "
                              f"multiple of {patch} (at least {patch}); got {config.input_size}")


def build_spec(config: LabelConfig) -> RunSpec:
    class_names = resolve_vocabulary(config)
    try:
        templates = list(resolve_templates(config.templates))
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("templates:") else f"templates: {message}") from None
    contents = content_fingerprints(config)
    source = {**config.fingerprint_source(class_names, templates), **contents}
    return RunSpec(config, class_names, templates, fingerprint(source), contents)


def select_shards(shards: list[Shard], markers: dict[str, dict], spec: RunSpec,
                  inputs: Optional[dict[str, Optional[dict]]] = None) -> list[Shard]:
    """Shards still to label: not done (no readable labels, done under another fingerprint, or
    the input shard changed since: ``inputs`` maps its URL to its current identity), or with
    failed samples when retry_failed is set. ``markers`` holds only shards whose labels are
    readable (see ``verify_markers``)."""
    todo = []
    for shard in shards:
        marker = markers.get(shard.shard_id)
        done = (marker is not None and marker.get("fingerprint") == spec.fingerprint
                and same_file_version(marker.get("input"), (inputs or {}).get(shard.url)))
        if spec.config.overwrite or not done or (spec.config.retry_failed and marker.get("errors", 0) > 0):
            todo.append(shard)
    return todo


def connect_ray(config: LabelConfig) -> None:
    """Join the cluster at ray_address / RAY_ADDRESS, or start a local one; an address that does
    not answer is a ConfigError within seconds, not Ray's minute of retries."""
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"namespace": NAMESPACE, "log_to_driver": True}
    if not address or address == "local":  # start a local cluster: no dashboard needed
        kwargs["include_dashboard"] = False
    else:
        _check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise ConfigError(f"ray_address: cannot connect to the Ray cluster at {address}: "
                          f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a TCP connection."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray_address: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:10001, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"ray_address: nothing answers at {hostport} ({err.strerror or err}); "
                          "is the Ray head running there?") from None


def autoscaler_present() -> bool:
    """Whether the cluster can add nodes: Ray's autoscaler v2, or a v1 autoscaler whose node types
    come from a cluster config (a cluster without one mirrors its nodes as types named node_<id>)."""
    from ray.experimental.internal_kv import _internal_kv_get
    try:
        if _internal_kv_get("__autoscaler_v2_enabled") == b"1":
            return True
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:  # an older Ray or no monitor: assume none
        return False
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items()) \
        or bool(report.get("pending_launches")) or bool(report.get("pending_nodes"))


def worker_capacity(resources: dict) -> int:
    """How many workers with these resources the cluster's live nodes can hold at once."""
    need = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
    need = {name: amount for name, amount in need.items() if amount > 0}
    capacity = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        capacity += min((int(have.get(name, 0) / amount + 1e-9) for name, amount in need.items()), default=0)
    return capacity


def _cluster_text() -> str:
    total = ray.cluster_resources()
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return f"{alive} node(s) with {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU in all"


def ensure_schedulable(pool: "WorkerPool", out) -> None:
    """Fail at once if the workers can never be scheduled on this cluster; with an autoscaler,
    wait (visibly) up to schedule_timeout_s for it to add the nodes."""
    config = pool.config
    if worker_capacity(pool.resources) >= pool.size:
        return
    wants = f"{pool.size} worker(s) x {pool.resources['num_cpus']:g} CPU"
    if pool.resources["num_gpus"]:
        wants += f" + {pool.resources['num_gpus']:g} GPU"
    if not autoscaler_present():
        if pool.resources["num_gpus"] and not ray.cluster_resources().get("GPU"):
            key = "device" if config.device == "cuda" else "gpus_per_worker"
            raise ConfigError(f"{key}: {wants} asked for, but the cluster ({_cluster_text()}) has no GPUs and "
                              "no autoscaler; use device: cpu or a cluster with GPUs")
        key = "num_workers" if worker_capacity(pool.resources) >= 1 else "cpus_per_worker"
        raise ConfigError(f"{key}: {wants} can never be scheduled on this cluster ({_cluster_text()}, room for "
                          f"{worker_capacity(pool.resources)}); lower num_workers or cpus_per_worker")
    print(f"gemlabel: waiting up to {config.schedule_timeout_s:g}s for the autoscaler to provide {wants} "
          f"(now: {_cluster_text()})", file=out, flush=True)
    deadline = time.monotonic() + config.schedule_timeout_s
    while worker_capacity(pool.resources) < pool.size:
        if time.monotonic() > deadline:
            raise ConfigError(f"schedule_timeout_s: the autoscaler did not provide {wants} within "
                              f"{config.schedule_timeout_s:g}s (now: {_cluster_text()})")
        time.sleep(2.0)


class WorkerStartError(RuntimeError):
    """The workers could not load the model (weights, model name, device)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the run; the message says what was finished and how to resume."""

    def __init__(self, summary: "RunSummary"):
        left = summary.shards_total - summary.shards_skipped - summary.shards_done - summary.shards_failed
        super().__init__(f"interrupted: {summary.shards_done} shard(s) labelled in this run, {summary.shards_skipped} "
                         f"were already done, {left} left; rerun the same command to label the rest "
                         "(finished shards are kept)")
        self.summary = summary


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
            self.spec, None, self.torch_threads, self._vocabulary, self.sizing)
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

    def start(self, summary: "RunSummary") -> list:
        """Start the workers and wait until each has loaded the model. The same error from an
        actor's constructor is a model problem (WorkerStartError, exit 2); an actor that died
        while loading (killed, OOM, node lost) is replaced, counting against max_actor_restarts."""
        pending = {actor.describe.remote(): actor for actor in (self.new_actor() for _ in range(self.size))}
        started = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except RayActorError as err:
                if err.actor_init_failed:
                    raise WorkerStartError(f"workers could not start: {_error_text(err)}") from None
                ray.kill(actor)
                summary.actor_restarts += 1
                if summary.actor_restarts > self.config.max_actor_restarts:
                    raise WorkersLostError(f"{summary.actor_restarts} workers died while loading the model "
                                           f"(max_actor_restarts={self.config.max_actor_restarts}); last: "
                                           f"{_error_text(err)}") from None
                log.warning("a worker died while loading the model (%s); starting another", _error_text(err))
                replacement = self.new_actor()
                pending[replacement.describe.remote()] = replacement
                continue
            started.append(actor)
        self._share_vocabulary(started)
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
            raise WorkerStartError(f"workers could not start: {_error_text(cause)}") from None


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    text = str(cause if cause is not None else err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def label_shards(pool: WorkerPool, actors: list, todo: Iterable[Shard], summary: RunSummary,
                 on_result: Callable[[Shard, Optional[dict]], None]) -> None:
    """Dispatch shards to the started actors until each is done or has failed for good. Each
    actor holds up to ``shards_per_worker`` shards (``_next_slot``). A replacement actor gets
    shards only once it has started, so when a node is lost (and its replacement cannot be placed
    yet) the surviving actors take its shards."""
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
                                   f"{config.max_actor_restarts}); last: {_error_text(err)}") from None
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
        ready, _ = ray.wait([*inflight, *starting], num_returns=1)
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
                            shard.url, _error_text(err))
                suspects.add(shard)
                summary.shard_retries += 1
                queue.append(shard)
            else:
                log.warning("worker died while labelling %s (%s); retrying elsewhere", shard.url, _error_text(err))
                attempts[shard] += 1
                _retry_or_fail(shard, attempts, queue, summary, _error_text(err), config, on_result)
            if actor not in dead:  # one replacement per dead actor, however many shards it held
                replace(actor, err)
            continue
        except RayTaskError as err:  # the shard could not be read
            attempts[shard] += 1
            _retry_or_fail(shard, attempts, queue, summary, _error_text(err), config, on_result)
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
    summary.failed[shard.url] = error
    try:  # a note for `gemlabel report`; the shard is not done either way, so a rerun redoes it
        write_json(OutputLayout(config.location(config.output)).failed_file(shard.shard_id),
                   {"shard": shard.url, "shard_id": shard.shard_id, "error": error, "attempts": attempts[shard],
                    "failed_at": datetime.now(timezone.utc).isoformat()})
    except Exception as err:  # the output's storage is failing too (outage)
        log.warning("could not record %s as failed: %s", shard.url, _first_line(err))
    on_result(shard, None)


def filesystem_parameters(protocol: str) -> set[str]:
    """The option names a protocol's fsspec filesystem takes (its and its bases' named
    parameters), plus the top-level endpoint_url/region_name that pipeline.storage moves for s3."""
    import inspect

    import fsspec
    names = {"endpoint_url", "region_name"} if protocol in ("s3", "s3a") else set()
    for klass in fsspec.get_filesystem_class(protocol).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {name for name, param in inspect.signature(init).parameters.items()
                      if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}
    return names | {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}


def check_storage_options(config: LabelConfig) -> None:
    """Each protocol's options must be ones its fsspec filesystem takes (fsspec would silently
    ignore a misspelt key such as endpont_url)."""
    for protocol, options in config.storage_options.items():
        try:
            known = filesystem_parameters(protocol)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"storage_options.{protocol}: {_first_line(err)}") from None
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"storage_options.{protocol}: unknown key {unknown[0]} for the {protocol} "
                              f"filesystem (known: {', '.join(sorted(known))})")


def check_output_location(output: str) -> None:
    """A local output must be (or be creatable as) a folder: not a file, nor under one."""
    if "://" in output and not output.startswith("file://"):
        return
    path = os.path.abspath(output[len("file://"):] if output.startswith("file://") else output)
    if os.path.isfile(path):
        raise ConfigError(f"output: {output} is a file; give a folder (it is created if missing)")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"output: {output} is under {parent}, which is a file, not a folder")


def with_read_timeout(config: LabelConfig) -> LabelConfig:
    """HTTP(S) streams get a read timeout (aiohttp's default waits 5 minutes in all), so a stalled
    server fails the shard in read_timeout_s; a timeout the user set in client_kwargs wins."""
    import aiohttp
    options = {protocol: dict(values) for protocol, values in config.storage_options.items()}
    for protocol in ("http", "https"):
        client = dict(options.get(protocol, {}).get("client_kwargs", {}))
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                           sock_read=config.read_timeout_s))
        options.setdefault(protocol, {})["client_kwargs"] = client
    return dataclasses.replace(config, storage_options=options)


def _shard_error(shard: Shard, error: str, config: LabelConfig) -> str:
    """The error recorded for a shard; a read timeout says that the stream stalled, and where."""
    if "Timeout" in error and protocol_of(shard.url) in ("http", "https"):
        return f"stalled: no data for {config.read_timeout_s:g}s while reading {shard.url} ({error.strip()})"
    return error


class RunRecordError(RuntimeError):
    """The output's storage stayed unreachable: the run record could not be written."""


def record_run(file: Location, summary: RunSummary, out, wait_s: float = RECORD_WAIT_S) -> None:
    """Write the run record; while the output's storage is unreachable, wait for it (saying so)
    up to ``wait_s``, then give up with RunRecordError (the labels written so far stay done)."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            write_json(file, summary.as_record())
            return
        except Exception as err:  # fsspec back ends raise their own kinds
            if time.monotonic() > deadline:
                raise RunRecordError(
                    f"storage unreachable, run record not written ({_first_line(err)}): {summary.shards_done} "
                    f"shard(s) labelled, {summary.shards_failed} failed, {summary.shards_skipped} already done; "
                    "rerun the same command once storage is back") from None
            if not said:
                print(f"gemlabel: cannot write the run record ({_first_line(err)}); retrying for up to "
                      f"{wait_s:g}s", file=out, flush=True)
                said = True
            time.sleep(2.0)


def run_labeling(config: LabelConfig, out=None, summary_out=None) -> RunSummary:
    """Label every shard of the input not yet done in the output; progress goes to ``out``
    (default stderr), the summary to ``summary_out`` (default stdout). Raises ConfigError on a
    bad vocabulary, templates, model, an output made with other settings, or workers the cluster
    can never schedule -- all before the output is claimed."""
    out = out or sys.stderr
    started = datetime.now(timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    config = with_read_timeout(resolve_paths(config))
    check_output_location(config.output)
    spec = build_spec(config)
    layout = OutputLayout(config.location(config.output))
    check_storage_options(config)
    try:
        shards = list_shards([config.location(pattern) for pattern in config.input])
    except (ValueError, OSError) as err:
        raise ConfigError(f"input: {_first_line(err)}") from None
    except Exception as err:  # e.g. botocore's NoCredentialsError
        raise ConfigError(f"input: cannot list {', '.join(config.input)}: {_first_line(err)}") from None
    if not shards:
        raise ConfigError("input: no shards found")
    check_model(config)
    markers, unreadable = verify_markers(layout, read_markers(layout))
    for shard_id, why in sorted(unreadable.items()):
        log.warning("relabelling %s: %s", shard_id, why)
    inputs = {url: file_identity(info) for url, info in
              stat_files([config.location(s.url) for s in shards]).items()}
    todo = select_shards(shards, markers, spec, inputs)
    summary = RunSummary(run_id, config.output, started.isoformat(), shards_total=len(shards),
                         shards_skipped=len(shards) - len(todo))
    pool = None
    if todo:  # the workers must fit the cluster before the output is claimed
        connect_ray(config)
        pool = WorkerPool(spec, run_id)
        ensure_schedulable(pool, out)
    prepare_output(layout, spec.fingerprint, spec.source, config.overwrite, run_id)
    stale = layout.remove_stale_temps(time.time() - STALE_TEMP_S)
    if stale:
        log.info("removed %d temp file(s) that writers killed mid-write left over an hour ago", stale)
    wall = time.perf_counter()
    try:
        if pool is not None:
            _label_with_progress(pool, todo, summary, wall, len(shards), config, out)
            summary.text_encodes = pool.text_encodes()
        summary.status = "failed" if summary.shards_failed else "ok"
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise RunInterrupted(summary) from None
    except BaseException as err:
        summary.status, summary.error = "error", _first_line(err)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        summary.seconds = time.perf_counter() - wall
        summary.finished_at = datetime.now(timezone.utc).isoformat()
        record_run(layout.run_file(run_id), summary, out)
    print(summary.text(), file=summary_out or sys.stdout, flush=True)
    return summary


def _label_with_progress(pool: WorkerPool, todo: list[Shard], summary: RunSummary, wall: float, total: int,
                         config: LabelConfig, out) -> None:
    actors = pool.start(summary)
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
