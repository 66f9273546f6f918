"""One shard through overlapped stages: threads joined by bounded queues, results in shard order.

    tar reader -> decode pool -> batcher -> model thread -> post-processing pool -> collector

The model thread only runs the model: decoding runs ahead of it and post-processing (label maps,
RLE) behind it, so an accelerator is never waiting for the CPU while the CPU stages keep up.
Each queue holds a couple of batches at most, so memory stays bounded whatever the shard's size,
and the time every stage waits for input ("_wait_s": it is starved) or for room downstream
("_blocked_s": the next stage is slower) is recorded, which makes a slow stage visible.

``sequential=True`` runs the same stage functions one after another on the caller's thread (no
overlap at all), so benchmarks can compare the two on the same code.

Between shards, ``ReadingTurns`` lets a worker that holds two shards start reading the next one as
soon as the current one's last sample has been read: the next shard's decoding then overlaps this
one's last batches, post-processing and write, so the model does not wait while a shard drains
and the next one fills.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from pipeline.worker.decode import DecodedSample

Decode = Callable[[int, dict], DecodedSample]
# A batch -> ([(sample, model output)], wait): ``wait`` blocks until the outputs are computed
# (an accelerator's event), or is None when they already are.
Model = Callable[[list[DecodedSample]], tuple[list[tuple[DecodedSample, Any]], Optional[Callable[[], None]]]]
Postprocess = Callable[[DecodedSample, Any], dict]  # one image's model output -> its row

_END = object()


class _Stopped(Exception):
    """Another stage failed or the consumer went away: this stage ends quietly."""


@dataclass
class _Failure:
    error: BaseException


@dataclass(frozen=True)
class StageSettings:
    batch_size: int
    decode_threads: int
    postprocess_threads: int
    queue_batches: int = 2      # batches that may wait between two stages
    sequential: bool = False


class ShardStages:
    """Runs one shard's samples through decode -> model -> post-processing; ``run`` returns the
    rows (ordered by position in the shard). Decoding errors become rows via ``error_row``;
    a failure of the sample source (an unreadable shard) is raised from ``run``."""

    def __init__(self, settings: StageSettings, decode: Decode, model: Model, postprocess: Postprocess,
                 error_row: Callable[[DecodedSample], dict], timings: Counter):
        self.settings = settings
        self._decode, self._model, self._postprocess, self._error_row = decode, model, postprocess, error_row
        self.timings = timings
        for key in ("read_s", "decode_s", "resize_s", "model_s", "read_blocked_s", "batch_wait_s",
                    "batch_blocked_s", "model_wait_s", "model_blocked_s", "collect_wait_s"):
            timings[key] += 0.0  # every key exists before threads update them (one writer per key)

    def run(self, samples: Iterable[dict], read_done: Callable[[], None] = lambda: None) -> list[dict]:
        """``read_done`` is called once the last sample has been read, or reading stopped: the
        worker's next shard may start reading then (``ReadingTurns``)."""
        run = self._run_sequential if self.settings.sequential else self._run_overlapped
        try:
            rows = run(samples, read_done)
        finally:
            read_done()
        rows.sort(key=lambda row: row["_index"])
        return rows

    # -- shared pieces -------------------------------------------------------------------------
    def _timed_samples(self, samples: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        iterator, index = iter(samples), 0
        while True:
            start = time.perf_counter()
            try:
                raw = next(iterator)
            except StopIteration:
                return
            finally:
                self.timings["read_s"] += time.perf_counter() - start
            yield index, raw
            index += 1

    def _count_decode(self, sample: DecodedSample) -> None:
        self.timings["decode_s"] += sample.decode_s
        self.timings["resize_s"] += sample.resize_s

    def _wait_and_postprocess(self, pending, submit: Callable) -> list:
        pairs, wait = pending
        if wait is not None:  # the accelerator finishing this batch: model time too
            start = time.perf_counter()
            wait()
            self.timings["model_s"] += time.perf_counter() - start
        return [submit(sample, output) for sample, output in pairs]

    # -- no overlap ------------------------------------------------------------------------------
    def _run_sequential(self, samples: Iterable[dict], read_done: Callable[[], None]) -> list[dict]:
        rows, batch = [], []
        for index, raw in self._timed_samples(samples):
            sample = self._decode(index, raw)
            self._count_decode(sample)
            if sample.error:
                rows.append(self._error_row(sample))
                continue
            batch.append(sample)
            if len(batch) == self.settings.batch_size:
                rows += self._wait_and_postprocess(self._model(batch), self._postprocess)
                batch = []
        read_done()
        if batch:
            rows += self._wait_and_postprocess(self._model(batch), self._postprocess)
        return rows

    # -- overlapped ------------------------------------------------------------------------------
    def _run_overlapped(self, samples: Iterable[dict], read_done: Callable[[], None]) -> list[dict]:
        size = self.settings.batch_size
        self._stop = threading.Event()
        decoded: queue.Queue = queue.Queue(maxsize=self.settings.queue_batches * size)  # futures, in order
        batches: queue.Queue = queue.Queue(maxsize=self.settings.queue_batches)
        outputs: queue.Queue = queue.Queue(maxsize=self.settings.queue_batches * size)  # futures of rows
        self._error_rows: list[dict] = []
        decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        post_pool = ThreadPoolExecutor(self.settings.postprocess_threads, thread_name_prefix="postprocess")
        threads = [threading.Thread(target=self._guard, args=(body, out), name=name, daemon=True)
                   for name, body, out in (
                       ("read", lambda: self._read(samples, decode_pool, decoded, read_done), decoded),
                       ("batch", lambda: self._batch(decoded, batches), batches),
                       ("model", lambda: self._run_model(batches, outputs, post_pool), outputs))]
        for thread in threads:
            thread.start()
        rows = []
        try:
            while True:
                item = self._get(outputs, "collect_wait_s")
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                start = time.perf_counter()
                rows.append(item.result())
                self.timings["collect_wait_s"] += time.perf_counter() - start
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
            decode_pool.shutdown(wait=True, cancel_futures=True)
            post_pool.shutdown(wait=True, cancel_futures=True)
        return rows + self._error_rows

    def _guard(self, body: Callable[[], None], out: queue.Queue) -> None:
        """Run a stage; its failure travels downstream to the collector, which raises it."""
        try:
            body()
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            try:
                self._put(out, _Failure(err), None)
            except _Stopped:
                pass

    def _put(self, q: queue.Queue, item, wait_key: Optional[str]) -> None:
        start = time.perf_counter()
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if wait_key:
            self.timings[wait_key] += time.perf_counter() - start

    def _get(self, q: queue.Queue, wait_key: str):
        start = time.perf_counter()
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                item = q.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        self.timings[wait_key] += time.perf_counter() - start
        return item

    def _read(self, samples: Iterable[dict], pool: ThreadPoolExecutor, decoded: queue.Queue,
              read_done: Callable[[], None]) -> None:
        try:
            for index, raw in self._timed_samples(samples):
                self._put(decoded, pool.submit(self._decode, index, raw), "read_blocked_s")
        finally:
            read_done()
        self._put(decoded, _END, None)

    def _batch(self, decoded: queue.Queue, batches: queue.Queue) -> None:
        batch: list[DecodedSample] = []
        while True:
            item = self._get(decoded, "batch_wait_s")
            if item is _END or isinstance(item, _Failure):
                if batch and item is _END:
                    self._put(batches, batch, "batch_blocked_s")
                self._put(batches, item, None)
                return
            start = time.perf_counter()
            sample: DecodedSample = item.result()
            self.timings["batch_wait_s"] += time.perf_counter() - start
            self._count_decode(sample)
            if sample.error:
                self._error_rows.append(self._error_row(sample))
                continue
            batch.append(sample)
            if len(batch) == self.settings.batch_size:
                self._put(batches, batch, "batch_blocked_s")
                batch = []

    def _run_model(self, batches: queue.Queue, outputs: queue.Queue, pool: ThreadPoolExecutor) -> None:
        """On an accelerator: launch batch N, then hand batch N-1 on once it is computed, so the
        device always has the next batch queued while the CPU post-processes the previous one.
        A batch computed synchronously (CPU) is handed on at once."""
        pending = None

        def submit(sample: DecodedSample, output) -> Future:
            future = pool.submit(self._postprocess, sample, output)
            self._put(outputs, future, "model_blocked_s")
            return future

        while True:
            item = self._get(batches, "model_wait_s")
            if item is _END or isinstance(item, _Failure):
                if pending is not None and item is _END:
                    self._wait_and_postprocess(pending, submit)
                self._put(outputs, item, None)
                return
            launched = self._model(item)
            if pending is not None:
                self._wait_and_postprocess(pending, submit)
                pending = None
            if launched[1] is None:  # computed already (CPU): post-process it now
                self._wait_and_postprocess(launched, submit)
            else:
                pending = launched


class ReadingTurns:
    """A worker's shards take turns at reading: ``turn()`` waits until no other shard of this
    worker is reading, and yields the call that ends the turn (``ShardStages.run``'s ``read_done``;
    it ends anyway when the block is left). With two shards given to a worker at once, the second
    starts reading the moment the first has read its last sample, never earlier: at most one shard
    fills while another drains, so memory and threads stay near one shard's."""

    def __init__(self):
        self._turn = threading.Semaphore(1)

    @contextlib.contextmanager
    def turn(self) -> Iterator[Callable[[], None]]:
        self._turn.acquire()
        ended, lock = [False], threading.Lock()

        def end() -> None:
            with lock:
                if not ended[0]:
                    ended[0] = True
                    self._turn.release()
        try:
            yield end
        finally:
            end()
