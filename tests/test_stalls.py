"""A shard that cannot be read never hangs the run (issue 18.10): a FIFO (any non-regular file)
fails at once, a read that gives nothing for read_timeout_s fails as stalled, and the worker's
other shards go on."""
import os
import threading
import time

import pytest

from pipeline.io.guarded import StalledRead, guarded_open
from pipeline.io.storage import Location
from pipeline.io.tar import ShardReadError, iter_tar_samples
from tests.shards import write_shards


def finishes_within(seconds: float, call):
    """call()'s result, raising AssertionError if it has not returned in ``seconds`` (a hang)."""
    result, done = [], threading.Event()

    def run():
        try:
            result.append(call())
        except BaseException as err:  # noqa: BLE001
            result.append(err)
        done.set()
    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), f"still running after {seconds}s"
    return result[0]


def test_a_fifo_shard_fails_at_once(tmp_path):
    fifo = tmp_path / "stuck.tar"
    os.mkfifo(fifo)
    outcome = finishes_within(10, lambda: list(iter_tar_samples(Location(str(fifo)), stall_s=None)))
    assert isinstance(outcome, ShardReadError) and "is a FIFO, not a regular file" in str(outcome)
    outcome = finishes_within(10, lambda: list(iter_tar_samples(Location(str(tmp_path)), stall_s=5)))
    assert isinstance(outcome, ShardReadError) and "is a folder" in str(outcome)


def test_a_read_that_gives_nothing_fails_as_stalled_saying_where():
    release = threading.Event()

    class Stuck:
        def __init__(self):
            self.given = False

        def read(self, size):  # a few bytes, then nothing (a stalled object-store body, a hung mount)
            if not self.given:
                self.given = True
                return b"x" * 100
            release.wait(60)
            return b""

        def close(self):
            pass

    start = time.monotonic()
    stream = guarded_open(Stuck, "s3://bucket/s.tar", stall_s=0.5)
    try:
        with pytest.raises(StalledRead, match=r"stalled: no data for 0.5s while reading s3://bucket/s.tar \(after 100 bytes\)"):
            stream.read(1000)
    finally:
        release.set()
    assert time.monotonic() - start < 5


@pytest.mark.usefixtures("ray_session")
def test_a_fifo_among_the_shards_does_not_hold_up_the_others(base_config, tmp_path):
    from pipeline.config import load_config
    from pipeline.driver.run import run_labeling
    good = [str(p) for p in write_shards(tmp_path / "in", shards=3, per_shard=2)]
    fifo = tmp_path / "in" / "pipe.tar"
    os.mkfifo(fifo)
    config = load_config(None, {**base_config, "input": [str(fifo), *good], "num_workers": 1,
                                "shards_per_worker": 2, "max_shard_retries": 1})
    summary = finishes_within(120, lambda: run_labeling(config))
    assert not isinstance(summary, BaseException), summary
    assert (summary.shards_done, summary.shards_failed) == (3, 1)
    assert "is a FIFO, not a regular file" in summary.failed[str(fifo)]
