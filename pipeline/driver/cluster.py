"""Joining Ray and sizing up the cluster: an address that does not answer fails in seconds, and
workers the cluster can never schedule fail at once (or, with an autoscaler, after a visible wait)."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import ray

from pipeline.config import ConfigError, LabelConfig
from pipeline.config.errors import first_line
from pipeline.driver.pool import WorkerPool


NAMESPACE = "gemlabel"


def connect_ray(config: LabelConfig) -> None:
    """Join the cluster at ray_address / RAY_ADDRESS, or start a local one (see ``connect``)."""
    connect(config.ray_address)


def connect(address: Optional[str], name: str = "ray_address") -> None:
    """Join the cluster at ``address`` / RAY_ADDRESS, or start a local one; an address that does
    not answer is a ConfigError (naming the setting ``name``) within seconds, not Ray's minute of
    retries. Every command that uses Ray joins through here (label, eval, export)."""
    if address and address != "local":  # checked even when joined: a wrong address is never ignored
        check_reachable(address, name)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"namespace": NAMESPACE, "log_to_driver": True}
    if not address or address == "local":  # start a local cluster: no dashboard needed
        kwargs["include_dashboard"] = False
        quiet_local_auth()
    else:
        check_reachable(address, name)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        raise ConfigError(f"{name}: cannot connect to the Ray cluster at {address}: "
                          f"{first_line(err)}") from None


def quiet_local_auth() -> None:
    """A local cluster this process starts keeps Ray's default, token authentication (RAY_AUTH_MODE
    as the user set it, if at all), without Ray's notices about it ("Token authentication is
    enabled for this Ray cluster", "Generated new authentication token and saved to
    ~/.ray/auth_token"): nothing in a local run needs the token or anything from the user."""
    import logging
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def check_reachable(address: str, name: str = "ray_address", timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a TCP connection."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or any(ch.isspace() for ch in hostport):
        raise ConfigError(f"{name}: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:10001, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError, OverflowError) as err:
        raise ConfigError(f"{name}: nothing answers at {hostport} ({getattr(err, 'strerror', None) or err}); "
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
