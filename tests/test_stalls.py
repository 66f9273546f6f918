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


class StallingProxy:
    """A TCP relay to a server that passes each response on until ``after`` bytes of one
    connection, then sends nothing more (the connection stays open): a stalled object-store body."""

    def __init__(self, target_port: int, after: int):
        import socket
        self.target_port, self.after, self.release = target_port, after, threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.after), daemon=True).start()

    def _pump(self, source, sink, limit):
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    sink.sendall(data[:max(limit - sent, 0)])
                    self.release.wait(120)
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass

    def stop(self):
        self.release.set()
        self.listener.close()


def test_a_stalled_s3_body_fails_saying_stalled_and_where(s3_endpoint, tmp_path):
    """Issue 18.17: was ``IndexError: tuple index out of range`` after ~100 s."""
    import s3fs
    from tests.conftest import S3_CREDENTIALS
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("stall")
    (shard,) = write_shards(tmp_path, shards=1, per_shard=6)
    fs.put_file(str(shard), "stall/s.tar")
    proxy = StallingProxy(int(s3_endpoint.rsplit(":", 1)[1]), after=shard.stat().st_size // 2)
    options = {"s3": {"endpoint_url": f"http://127.0.0.1:{proxy.port}", **S3_CREDENTIALS,
                      "skip_instance_cache": True}}
    start = time.monotonic()
    try:
        outcome = finishes_within(60, lambda: list(iter_tar_samples(Location("s3://stall/s.tar", options), stall_s=2)))
    finally:
        proxy.stop()
    assert isinstance(outcome, ShardReadError), outcome
    assert str(outcome).startswith("StalledRead: stalled: no data for 2s while ") and "s3://stall/s.tar" in str(outcome)
    assert time.monotonic() - start < 30


def test_an_http_error_status_is_said(tmp_path):
    """Issue 18.17: an HTTP 500 was recorded as ``FileNotFoundError: URL``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(500)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/s.tar"
    try:
        outcome = finishes_within(30, lambda: list(iter_tar_samples(Location(url), stall_s=5)))
    finally:
        server.shutdown()
    assert isinstance(outcome, ShardReadError)
    assert str(outcome) == f"HTTPError: the server answered 500 Internal Server Error for {url}"
