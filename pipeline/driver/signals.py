"""SIGTERM (a scheduler's stop, ``kill``, a container shutdown) stops a run as Ctrl-C does.

Ray's ``init`` makes SIGTERM a ``sys.exit`` in the driver, which leaves Ray's and tqdm's threads
running while the interpreter exits (abort, rc -6, a C++ stack dump) and skips the run record.
As a KeyboardInterrupt on the main thread it takes the SIGINT path instead: the shards in flight
are abandoned, finished ones are kept, the run is recorded as interrupted and one line says so.
"""
from __future__ import annotations

import signal
import threading


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (called again after ``ray.init``,
    which replaces the handler); a no-op off the main thread, where no handler can be set."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
