"""Reading a shard so that it can never hang a worker: every open and read has a deadline.

A local read of a FIFO, a hung NFS mount, an object-store body that stops sending: each would
otherwise block the worker's reading thread for good (and with it the worker's next shard, which
waits for its reading turn). Here the open and each read run on a helper thread and the caller
waits at most ``stall_s`` for it; past that the read raises ``StalledRead`` saying where, and the
helper thread (stuck in the kernel or a socket, where nothing can interrupt it) is abandoned as a
daemon. Non-regular local files (FIFOs, devices, sockets) are refused before they are opened.
"""
from __future__ import annotations

import io
import os
import stat
import threading
from concurrent.futures import Future
from typing import IO, Callable, Optional, TypeVar

T = TypeVar("T")

READ_CHUNK = 1 << 20  # bytes asked of the storage per guarded read


class StalledRead(TimeoutError):
    """No data came for ``stall_s`` seconds."""


class NotARegularFile(OSError):
    """A local shard that is a FIFO, device, socket or folder: reading it could block forever."""


def check_regular(path: str) -> None:
    """Raise NotARegularFile unless the local ``path`` is a regular file (a missing one is left
    to the open, which says so)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise NotARegularFile(f"{path} is {kind}, not a regular file: it cannot be read as a tar shard")


def with_deadline(call: Callable[[], T], stall_s: float, what: str) -> T:
    """``call()``'s result, or StalledRead if it has not returned within ``stall_s`` seconds."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(err)
    threading.Thread(target=run, name="guarded-read", daemon=True).start()
    try:
        return future.result(timeout=stall_s)
    except TimeoutError:
        if future.done():
            raise
        raise StalledRead(f"stalled: no data for {stall_s:g}s while {what}") from None


class _GuardedRaw(io.RawIOBase):
    def __init__(self, opener: Callable[[], IO[bytes]], stall_s: float, url: str):
        self._stall_s, self._url = stall_s, url
        self._inner = with_deadline(opener, stall_s, f"opening {url}")
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = with_deadline(lambda: self._inner.read(len(buffer)), self._stall_s,
                             f"reading {self._url} (after {self._offset} bytes)")
        buffer[:len(data)] = data
        self._offset += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:  # a close may block as a read does (a stuck socket): give it the same deadline
                with_deadline(self._inner.close, self._stall_s, f"closing {self._url}")
            except StalledRead:
                pass
        super().close()


def guarded_open(opener: Callable[[], IO[bytes]], url: str, stall_s: Optional[float],
                 local_path: Optional[str] = None) -> IO[bytes]:
    """A buffered binary stream over ``opener()`` whose open and reads each fail with StalledRead
    after ``stall_s`` seconds without data (no deadline when None); ``local_path``: the file is
    local and must be a regular file."""
    if local_path is not None:
        check_regular(local_path)
    if stall_s is None:
        return opener()
    return io.BufferedReader(_GuardedRaw(opener, stall_s, url), buffer_size=READ_CHUNK)
