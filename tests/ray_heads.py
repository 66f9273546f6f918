"""Ray heads started by `ray start --head --block` for the cluster tests: their environment,
command line, start-up wait and stop, in one place."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ray_env(**extra: str) -> dict:
    """This environment with the venv's ``ray`` first on PATH and no auth token asked for."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def head_command(port: int, dashboard: int, num_cpus: int, temp_dir: str, *extra: str) -> list[str]:
    """`ray start --head` in the foreground on 127.0.0.1, in its own temp dir (so it does not
    become the machine's default cluster)."""
    return [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--num-cpus={num_cpus}",
            "--disable-usage-stats", f"--temp-dir={temp_dir}", *extra]


def dashboard_up(url: str, head: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Whether the head's dashboard answers within ``timeout_s``; the head must not exit meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return True
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
    return False


def wait_for_dashboard(url: str, head: subprocess.Popen) -> None:
    if not dashboard_up(url, head):
        pytest.fail("the Ray head's dashboard did not come up")


def stop_process_group(process: subprocess.Popen, term_grace_s: float, kill_leftovers: bool) -> None:
    """SIGTERM the process group of a process started with ``start_new_session``, SIGKILL it if
    the process outlives ``term_grace_s``. kill_leftovers: SIGKILL the group even when the process
    ended on SIGTERM (what it started may not have)."""
    for sig, grace in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
            if not kill_leftovers:
                return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
