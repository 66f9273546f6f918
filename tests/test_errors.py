"""Bad inputs and faults as a newcomer hits them: one line on stderr, the exact exit code, nothing
written, within seconds -- never a traceback or a silent wait."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.manifest import OutputLayout, read_runs
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    """The single line the command printed on stderr (asserts there is exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gemlabel: error: "), lines
    return lines[0]


def label_args(config: dict) -> list[str]:
    """`gemlabel label` flags for a base_config-like dict (flags, as a user would type them)."""
    args = ["label", "--input", *config["input"], "--output", config["output"], "--vocab", ",".join(config["vocab"]),
            "--model", config["model"], "--pretrained", config["pretrained"], "--model-config", config["model_config"],
            "--depth", str(config["gem"]["depth"]), "--input-size", *map(str, config["input_size"]),
            "--batch-size", str(config["batch_size"]), "--cpus-per-worker", str(config["cpus_per_worker"]),
            "--decode-threads", str(config["decode_threads"]), "--no-progress"]
    return args


@pytest.fixture
def shards(tmp_path) -> list[str]:
    return [str(p) for p in write_shards(tmp_path / "in", shards=2, per_shard=3)]


# ---- B: workers that can never be scheduled, before anything is written ----

@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("flags, message", [
    (["--num-workers", "5", "--cpus-per-worker", "1"], "num_workers: 5 worker(s) x 1 CPU can never be scheduled"),
    (["--cpus-per-worker", "4"], "cpus_per_worker: 1 worker(s) x 4 CPU can never be scheduled"),
    (["--device", "cuda"], "device: 1 worker(s) x 0.5 CPU + 1 GPU asked for, but the cluster"),
])
def test_unschedulable_workers_fail_at_once(base_config, shards, tmp_path, capsys, flags, message):
    config = {**base_config, "input": shards}
    start = time.monotonic()
    assert main([*label_args(config), *flags]) == 2
    assert time.monotonic() - start < 30
    assert message in one_line_error(capsys)
    assert not Path(config["output"]).exists()  # no _config.json, no run record


def test_unreachable_ray_address_fails_at_once(base_config, shards, tmp_path):
    from tests.conftest import free_port
    config = {**base_config, "input": shards}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *label_args(config), "--ray-address",
                             f"127.0.0.1:{free_port()}"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and time.monotonic() - start < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray_address: nothing answers at 127.0.0.1:" in lines[0], result.stderr
    assert not Path(config["output"]).exists()


@pytest.mark.usefixtures("ray_session")
def test_autoscaler_wait_is_visible_and_bounded(base_config, shards, capsys, monkeypatch):
    """With an autoscaler the driver waits for nodes, says so, and gives up after schedule_timeout_s."""
    import pipeline.runner as runner
    monkeypatch.setattr(runner, "autoscaler_present", lambda: True)  # no autoscaler can run on this machine
    config = {**base_config, "input": shards}
    start = time.monotonic()
    assert main([*label_args(config), "--num-workers", "9", "--schedule-timeout-s", "3"]) == 2
    assert 3 <= time.monotonic() - start < 30
    captured = capsys.readouterr().err.splitlines()
    assert captured[0].startswith("gemlabel: waiting up to 3s for the autoscaler to provide 9 worker(s)")
    assert captured[1].startswith("gemlabel: error: schedule_timeout_s: the autoscaler did not provide")
    assert len(captured) == 2 and not Path(config["output"]).exists()


@pytest.mark.usefixtures("ray_session")
def test_worker_killed_while_loading_the_model_is_replaced(base_config, shards, capsys):
    import ray
    from pipeline.runner import NAMESPACE, WORKER_PREFIX
    config = {**base_config, "input": shards}
    killed = []

    def kill_first_worker_while_it_loads():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["name"].startswith(WORKER_PREFIX) and actor["name"].endswith("-0"):
                    ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))
                    killed.append(actor["name"])
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker_while_it_loads)
    killer.start()
    assert main(label_args(config)) == 0, capsys.readouterr().err
    killer.join()
    assert killed
    (run,) = read_runs(OutputLayout(config["output"]))
    assert run["actor_restarts"] == 1 and run["shards_done"] == 2 and run["status"] == "ok"
