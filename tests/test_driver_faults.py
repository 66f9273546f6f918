"""The driver as users run it: a separate process, killed with SIGKILL, rerun; exit codes."""
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.io.storage import Location
from tests.shards import write_shards


def start_driver(config: dict, path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own cluster, never one another process started here
    return subprocess.Popen([sys.executable, "-m", "jobs.label", "--config", str(path)], start_new_session=True,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_stable(measure, quiet: float, timeout: float = 60) -> int:
    value, since, deadline = measure(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        current = measure()
        if current != value:
            value, since = current, time.monotonic()
    return value


def kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
def test_driver_sigkill_then_rerun_gives_the_uninterrupted_output(base_config, tmp_path):
    write_shards(tmp_path / "in", shards=6, per_shard=10)
    config = {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "output": str(tmp_path / "killed"),
              "batch_size": 2}
    layout = OutputLayout(Location(config["output"]))
    driver = start_driver(config, tmp_path / "job.yaml")
    deadline = time.monotonic() + 240
    while len(read_markers(layout)) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL
    # Ray ends a dead driver's workers within seconds; one may commit the shard it was on first.
    done_when_killed = wait_until_stable(lambda: len(read_markers(layout)), quiet=5.0)
    kill_group(driver.pid)  # the local Ray daemons the killed driver left behind
    assert 2 <= done_when_killed < 6

    code, log = finish(start_driver(config, tmp_path / "job.yaml"))
    assert code == 0, log
    assert f"{6 - done_when_killed} of 6 shards to label" in log and "6 total" in log

    clean = {**config, "output": str(tmp_path / "clean")}
    code, log = finish(start_driver(clean, tmp_path / "clean.yaml"))
    assert code == 0, log
    killed_files = sorted(p.name for p in (tmp_path / "killed" / "labels").iterdir())
    clean_files = sorted(p.name for p in (tmp_path / "clean" / "labels").iterdir())
    assert killed_files == clean_files and len(clean_files) == 6  # no partial or temporary files
    for name in clean_files:
        killed = pq.read_table(tmp_path / "killed" / "labels" / name)
        uninterrupted = pq.read_table(tmp_path / "clean" / "labels" / name)
        assert killed.equals(uninterrupted) and killed.schema.metadata == uninterrupted.schema.metadata


@pytest.mark.usefixtures("ray_session")
def test_exit_code_is_1_while_shards_remain_failed(base_config, tmp_path, capsys):
    (good,) = write_shards(tmp_path / "in", shards=1, per_shard=3)
    args = ["label", "--input", str(good), str(tmp_path / "in" / "gone.tar"), "--output", base_config["output"],
            "--vocab", "cat,dog", "--model", "gemtest-micro", "--pretrained", base_config["pretrained"],
            "--model-config", base_config["model_config"], "--depth", "3", "--input-size", "64",
            "--cpus-per-worker", "0.5", "--max-shard-retries", "0"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "gone.tar" in captured.out  # the summary is on stdout
    assert main(["report", base_config["output"]]) == 1
    report = capsys.readouterr().out
    assert "1 done, 1 failed" in report and "gone.tar" in report
