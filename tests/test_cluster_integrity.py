"""One output wherever the driver runs, and node loss, on real multi-process Ray clusters on
127.0.0.1 (issue 7): an external head, a driver in another folder, a second node killed mid-run."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.store.layout import OutputLayout, read_markers
from pipeline.io.storage import Location
from tests.conftest import free_port
from tests.outputs import all_rows
from tests.ray_heads import BIN, REPO, dashboard_up, head_command, ray_env, stop_process_group
from tests.shards import write_shards

# Lost nodes are noticed within seconds rather than the default ~30 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


def cluster_env(**extra: str) -> dict:
    """The environment of a test's Ray processes: an outer RAY_ADDRESS is dropped, the one given
    in ``extra`` (the test's own cluster) kept."""
    env = ray_env(**{"PYTHONPATH": str(REPO), **FAST_HEALTH_CHECKS})
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


def own_ports() -> list[str]:
    """Ports of a node's agents, picked free: the defaults (52365, ...) may be taken by other
    Ray clusters on this machine."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


def stop(process: subprocess.Popen) -> None:
    """End a `ray start --block` we started, and everything in its process group."""
    stop_process_group(process, 10, kill_leftovers=False)


class Head:
    def __init__(self, cwd: Path, attempts: int = 2):
        """A head that exits at start (e.g. a port picked free was taken meanwhile) is started
        again on other ports; its own output says why it failed."""
        for _ in range(attempts):
            self.port, self.dashboard = free_port(), free_port()
            self.temp_dir = tempfile.mkdtemp(prefix="rgi-", dir="/tmp")
            log = Path(self.temp_dir) / "head.log"
            with log.open("wb") as out:
                self.process = subprocess.Popen(
                    head_command(self.port, self.dashboard, 1, self.temp_dir,
                                 f"--ray-client-server-port={free_port()}", *own_ports()),
                    cwd=cwd, env=cluster_env(), start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
            try:
                if dashboard_up(self.dashboard_url, self.process):
                    return
            except AssertionError:  # the head exited
                pass
            stop(self.process)
        pytest.fail(f"the Ray head did not come up: {log.read_text(errors='replace')[-2000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def alive_nodes(self) -> int:
        script = ("import ray; ray.init(address='%s', log_to_driver=False); "
                  "print(sum(1 for n in ray.nodes() if n['Alive']))" % self.address)
        result = subprocess.run([sys.executable, "-c", script], env=cluster_env(), capture_output=True, text=True,
                                timeout=120)
        return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else -1


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` with one CPU, started from a folder of its own (not the driver's)."""
    head = Head(tmp_path_factory.mktemp("head-cwd"))
    yield head
    stop(head.process)


def driver(config: dict, cwd: Path, address: str) -> subprocess.CompletedProcess:
    (cwd / "job.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "jobs.label", "--config", "job.yaml"], cwd=cwd,
                          env=cluster_env(RAY_ADDRESS=address), capture_output=True, text=True, timeout=400)


def test_relative_paths_mean_the_drivers_folder_on_an_external_head(head, base_config, tmp_path):
    here = tmp_path / "driver-cwd"
    write_shards(here / "in", shards=2, per_shard=3)
    (here / "models").mkdir()
    (here / "models" / "gemtest-micro.json").write_text(Path(base_config["model_config"]).read_text())
    (here / "classes.txt").write_text("person\ndog\n")
    config = {**base_config, "input": ["in/*.tar"], "output": "labels", "vocab": [], "vocab_file": "classes.txt",
              "model_config": "models/gemtest-micro.json"}
    del config["vocab"]
    result = driver(config, here, head.address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = all_rows(str(here / "labels"))
    assert len(rows) == 6 and all(row["status"] == "ok" for row in rows)
    assert len(read_markers(OutputLayout(Location(str(here / "labels"))))) == 2
    assert not list(Path(head.temp_dir).rglob("labels/*.parquet"))


def test_a_relative_output_under_ray_job_submit_is_refused(head, base_config, tmp_path):
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
         "python", "-m", "jobs.label", "--input", str(tmp_path / "none.tar"), "--output", "rel/labels",
         "--vocab", "cat", "--model", "gemtest-micro", "--pretrained", base_config["pretrained"],
         "--model-config", base_config["model_config"]],
        cwd=REPO, env=cluster_env(), capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in log, log[-3000:]
    errors = {line for line in log.splitlines() if "gemlabel: error:" in line}  # the job log may repeat it
    assert len(errors) == 1 and "relative path" in min(errors) and "absolute path or a URL" in min(errors), log[-3000:]
    assert not list(Path(head.temp_dir).rglob("rel/labels"))


# Two Ray nodes on this machine, both on 127.0.0.1, as Ray's own tests make them
# (`ray start --address` refuses to join a second node on a loopback-only machine). The helper
# prints the cluster's address and the second node's raylet PID, and shuts the cluster down
# when its stdin closes.
TWO_NODES = textwrap.dedent("""
    import json, os, socket, sys
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    def port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def node_args(**extra):
        return dict(num_cpus=1, node_ip_address="127.0.0.1", dashboard_agent_listen_port=port(),
                    metrics_export_port=port(), runtime_env_agent_port=port(), **extra)

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)  # Cluster records its address there, whatever temp_dir says
    cluster = Cluster(initialize_head=True, head_node_args=node_args(temp_dir=sys.argv[1], include_dashboard=False))
    try:
        second = cluster.add_node(**node_args())
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address, "raylet": second.all_processes["raylet"][0].process.pid}),
              flush=True)
        sys.stdin.read()
    finally:
        cluster.shutdown()
""")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc: this machine is Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def test_losing_a_node_mid_run_gives_the_uninterrupted_output(base_config, tmp_path):
    # Shards long enough that the lost node's worker is still inside one when its raylet dies,
    # even with the overlapped worker (a few seconds a shard).
    write_shards(tmp_path / "in", shards=6, per_shard=32)
    config = {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "output": str(tmp_path / "lost"),
              "num_workers": 2, "cpus_per_worker": 1, "batch_size": 2}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    cluster = subprocess.Popen([sys.executable, "-c", TWO_NODES, tempfile.mkdtemp(prefix="rgn-", dir="/tmp")],
                               cwd=tmp_path, env=cluster_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    run = None
    try:
        started = json.loads(cluster.stdout.readline())
        run = subprocess.Popen([sys.executable, "-m", "jobs.label", "--config", "job.yaml"], cwd=tmp_path,
                               env=cluster_env(RAY_ADDRESS=started["address"]), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        layout = OutputLayout(Location(config["output"]))
        deadline = time.monotonic() + 300
        while not read_markers(layout) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # One worker per node, each holding up to two of the 6 shards: the second node is lost mid-shard,
        # its raylet and the worker processes under it at once, as when a machine goes away (a
        # worker whose raylet alone died could still finish its shard and answer the driver).
        for pid in process_tree(started["raylet"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log, _ = run.communicate(timeout=400)
        assert run.returncode == 0, log[-4000:]
        assert "6 labelled" in log and "actor restarts: 1" in log, log[-4000:]

        # The uninterrupted run, on the surviving node alone (one worker: its one CPU).
        clean = subprocess.run([sys.executable, "-m", "jobs.label", "--config", "job.yaml", "--output",
                                str(tmp_path / "clean"), "--num-workers", "1"], cwd=tmp_path, env=cluster_env(RAY_ADDRESS=started["address"]),
                               capture_output=True, text=True, timeout=400)
        assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(cluster)
    names = sorted(p.name for p in (tmp_path / "lost" / "labels").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "clean" / "labels").iterdir()) and len(names) == 6
    for name in names:
        lost, uninterrupted = (pq.read_table(tmp_path / out / "labels" / name) for out in ("lost", "clean"))
        assert lost.equals(uninterrupted) and lost.schema.metadata == uninterrupted.schema.metadata
