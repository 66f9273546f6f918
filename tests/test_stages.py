"""The overlapped shard stages: overlap, bounded memory, order, failures, visible slow stages."""
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipeline.worker.decode import DecodedSample
from pipeline.io.tar import ShardReadError
from pipeline.worker.stages import ReadingTurns, ShardStages, StageSettings


class FakeStages:
    """Stage functions that take fixed times while releasing the GIL, as decoders and kernels do;
    they count the decoded samples alive at once."""

    def __init__(self, decode_s=0.0, model_s=0.0, post_s=0.0, bad=()):
        self.decode_s, self.model_s, self.post_s, self.bad = decode_s, model_s, post_s, set(bad)
        self.alive = self.max_alive = 0
        self.lock = threading.Lock()

    def decode(self, index, raw):
        time.sleep(self.decode_s)
        if index in self.bad:
            return DecodedSample(index, raw["__key__"], error="decode: broken", error_kind="decode:X")
        with self.lock:
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        return DecodedSample(index, raw["__key__"], 8, 8, tensor=torch.zeros(1), decode_s=self.decode_s)

    def model(self, batch):
        time.sleep(self.model_s)
        return [(s, s.index * 10) for s in batch], None

    def postprocess(self, sample, output):
        time.sleep(self.post_s)
        with self.lock:
            self.alive -= 1
        return {"_index": sample.index, "key": sample.key, "out": output}

    def run(self, count, settings, timings=None):
        stages = ShardStages(settings, self.decode, self.model, self.postprocess,
                             lambda s: {"_index": s.index, "key": s.key, "error": s.error},
                             timings if timings is not None else Counter())
        return stages.run({"__key__": f"k{i}"} for i in range(count))


def test_rows_come_back_in_shard_order_with_error_rows_sequential_or_not():
    for sequential in (False, True):
        fake = FakeStages(bad={3, 17})
        rows = fake.run(40, StageSettings(4, 3, 2, sequential=sequential))
        assert [r["_index"] for r in rows] == list(range(40))
        assert [r["key"] for r in rows if "error" in r] == ["k3", "k17"]
        assert all(r["out"] == r["_index"] * 10 for r in rows if "out" in r)


def test_stages_overlap_and_a_slow_model_is_visible_as_waits():
    # decode 4 x 20 ms / batch on 4 threads, model 80 ms / batch, post 4 x 20 ms / batch on 4 threads
    times = {}
    for sequential in (True, False):
        timings = Counter()
        fake = FakeStages(decode_s=0.02, model_s=0.08, post_s=0.02)
        start = time.perf_counter()
        fake.run(64, StageSettings(4, 4, 4, sequential=sequential), timings)
        times[sequential] = time.perf_counter() - start
    # sequential: 16 batches x (80 + 80 + 80) ms = 3.8 s; overlapped: bound by the model, 16 x 80 ms = 1.3 s
    assert times[False] < 0.6 * times[True], times
    assert timings["batch_blocked_s"] > 0.5  # decoded batches wait for room: the model is the slow stage
    assert timings["model_wait_s"] < 0.5 * timings["batch_blocked_s"]


def test_a_slow_decoder_starves_the_model_and_shows_it():
    timings = Counter()
    FakeStages(decode_s=0.05).run(32, StageSettings(4, 1, 2), timings)
    assert timings["model_wait_s"] > 1.0 and timings["batch_wait_s"] > 1.0  # both wait for the decoder
    assert timings["batch_blocked_s"] < 0.1 * timings["model_wait_s"]


def test_memory_stays_bounded_whatever_the_shard_size():
    settings = StageSettings(batch_size=4, decode_threads=4, postprocess_threads=2, queue_batches=2)
    fake = FakeStages(model_s=0.01, post_s=0.002)
    rows = fake.run(600, settings)
    assert len(rows) == 600
    # decoded queue + batches waiting + the batch being formed, launched and pending + post-processing queue
    bound = 2 * 4 + 4 + 2 * 4 + 4 * 3 + 2 * 4 + 2
    assert fake.max_alive <= bound < 600


def test_an_unreadable_shard_raises_and_leaves_no_threads_behind():
    def samples():
        for i in range(10):
            yield {"__key__": f"k{i}"}
        raise ShardReadError("ReadError: truncated")

    before = threading.active_count()
    fake = FakeStages(model_s=0.01)
    stages = ShardStages(StageSettings(4, 2, 2), fake.decode, fake.model, fake.postprocess, lambda s: {}, Counter())
    with pytest.raises(ShardReadError, match="truncated"):
        stages.run(samples())
    time.sleep(0.2)
    assert threading.active_count() == before


def test_a_failing_model_stage_stops_the_others():
    fake = FakeStages()

    def model(batch):
        if batch[0].index >= 8:
            raise MemoryError("device lost")
        return fake.model(batch)

    before = threading.active_count()
    stages = ShardStages(StageSettings(4, 2, 2), fake.decode, model, fake.postprocess, lambda s: {}, Counter())
    with pytest.raises(MemoryError, match="device lost"):
        stages.run({"__key__": f"k{i}"} for i in range(1000))
    time.sleep(0.2)
    assert threading.active_count() == before


def test_an_asynchronous_device_keeps_one_batch_in_flight_and_loses_none():
    """As on a GPU: the model call only launches the work; ``wait`` blocks until it is done."""
    fake = FakeStages(post_s=0.005)
    launched, waited = [], []

    def model(batch):
        done = threading.Event()
        threading.Timer(0.03, done.set).start()  # the device computes for 30 ms
        launched.append(batch[0].index)
        return [(s, s.index * 10) for s in batch], lambda: (waited.append(batch[0].index), done.wait())

    timings = Counter()
    stages = ShardStages(StageSettings(4, 2, 2), fake.decode, model, fake.postprocess, lambda s: {}, timings)
    rows = stages.run({"__key__": f"k{i}"} for i in range(42))
    assert [r["out"] for r in rows] == [i * 10 for i in range(42)]
    assert launched == waited == list(range(0, 42, 4))
    assert timings["model_s"] > 0  # time spent waiting for the device counts as model time


def test_a_workers_next_shard_reads_while_the_last_one_drains():
    """Two shards given to one worker at once (Ray's max_concurrency): the second starts reading
    the moment the first has read its last sample, not before, and the two together take far less
    than one after the other (the second's decoding hides the first's post-processing tail)."""
    turns, model_lock = ReadingTurns(), threading.Lock()
    events: list[tuple[str, str, float]] = []
    in_model, most_in_model = [0], [0]

    def samples(name, count):
        for i in range(count):
            events.append((name, "read", time.perf_counter()))
            yield {"__key__": f"{name}{i}"}

    def run_shard(name, fake):
        def model(batch):
            with model_lock:  # as the worker: one batch at a time on the model
                in_model[0] += 1
                most_in_model[0] = max(most_in_model[0], in_model[0])
                try:
                    return fake.model(batch)
                finally:
                    in_model[0] -= 1
        stages = ShardStages(StageSettings(4, 8, 4), fake.decode, model, fake.postprocess, lambda s: {}, Counter())
        with turns.turn() as read_done:
            return stages.run(samples(name, 8), read_done)

    def elapsed(names):
        fake = FakeStages(decode_s=0.2, model_s=0.05, post_s=0.2)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(names)) as pool:
            rows = list(pool.map(lambda n: run_shard(n, fake), names))
        return time.perf_counter() - start, rows

    alone = sum(elapsed([name])[0] for name in ("a", "b"))
    events.clear()
    together, rows = elapsed(["a", "b"])
    assert [[r["key"] for r in shard] for shard in rows] == [[f"{n}{i}" for i in range(8)] for n in "ab"]
    first, second = sorted({name for name, _, _ in events}, key=lambda n: min(t for m, _, t in events if m == n))
    assert max(t for n, _, t in events if n == first) <= min(t for n, _, t in events if n == second)
    assert most_in_model[0] == 1
    # alone: 0.2 s fill + 2 x 0.05 model + 2 x 0.2 s post each = ~0.65 s a shard; together ~0.7 s for both
    assert together < 0.75 * alone, (together, alone)


def test_a_reading_turn_ends_when_the_shard_fails():
    turns = ReadingTurns()

    def broken():
        yield {"__key__": "k0"}
        raise ShardReadError("ReadError: truncated")

    fake = FakeStages()
    stages = ShardStages(StageSettings(4, 2, 2), fake.decode, fake.model, fake.postprocess, lambda s: {}, Counter())
    with pytest.raises(ShardReadError):
        with turns.turn() as read_done:
            stages.run(broken(), read_done)
    acquired = threading.Event()
    threading.Thread(target=lambda: (turns.turn().__enter__(), acquired.set()), daemon=True).start()
    assert acquired.wait(2.0)  # the next shard is not left waiting
