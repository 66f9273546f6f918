"""Images done in each shard still being labelled, published by the workers in Ray's internal
key-value store, so the driver's progress counts images mid-shard (a shard can take minutes,
and a one-shard run would otherwise show 0/1 until the end). Best effort: outside Ray, or
should the store not answer, nothing is published and labelling goes on."""
from __future__ import annotations

import threading
import time
from typing import Iterable, Optional

PREFIX = "gemlabel-progress/"


def _kv():
    from ray.experimental import internal_kv
    return internal_kv if internal_kv._internal_kv_initialized() else None


def progress_key(run_id: str, shard_id: str) -> str:
    return f"{PREFIX}{run_id}/{shard_id}"


class ShardProgress:
    """Counts one shard attempt's images; publishes the count at most every ``every_s`` seconds
    (each attempt starts again from 0, so a retried shard is not counted twice). Post-processing
    threads add to it at once: a lock keeps the count exact."""

    def __init__(self, key: Optional[str], every_s: float = 0.5):
        self.key, self.every_s, self.count, self._published = key, every_s, 0, 0.0
        self._lock = threading.Lock()
        self.publish()

    def add(self, images: int = 1) -> None:
        with self._lock:
            self.count += images
            due = time.monotonic() - self._published >= self.every_s
        if due:
            self.publish()

    def publish(self) -> None:
        kv = _kv() if self.key else None
        if kv is None:
            return
        try:
            kv._internal_kv_put(self.key, str(self.count).encode(), overwrite=True)
        except Exception:  # progress is for show: never fail a shard over it
            pass
        self._published = time.monotonic()


def images_in_flight(run_id: str, finished: Iterable[str]) -> int:
    """Images done so far in this run's shards not yet finished (their markers not yet counted)."""
    kv = _kv()
    if kv is None:
        return 0
    done = {progress_key(run_id, shard_id) for shard_id in finished}
    try:
        keys = [k.decode() if isinstance(k, bytes) else k for k in kv._internal_kv_list(f"{PREFIX}{run_id}/")]
        return sum(int(kv._internal_kv_get(key) or 0) for key in keys if key not in done)
    except Exception:
        return 0


def clear_progress(run_id: str) -> None:
    kv = _kv()
    if kv is not None:
        try:
            kv._internal_kv_del(f"{PREFIX}{run_id}/", del_by_prefix=True)
        except Exception:
            pass
