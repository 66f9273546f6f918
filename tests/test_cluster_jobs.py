"""Cluster use: `ray job submit` to a real Ray head, scheduled incremental runs, the manifests."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.manifest import OutputLayout, read_markers, read_runs
from tests.conftest import free_port
from tests.outputs import all_rows, check_labels
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def job_env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 in its own temp dir and process group (so it neither
    becomes the machine's default cluster nor outlives the tests)."""
    temp_dir = tempfile.mkdtemp(prefix="rgt-", dir="/tmp")
    dashboard = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=job_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
    else:
        pytest.fail("the Ray head's dashboard did not come up")
    yield address
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def submit(address: str, *job_args: str) -> str:
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                             "--", "python", "-m", "jobs.label", *job_args],
                            cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    return result.stdout


def micro_model_args(checkpoint: str) -> list[str]:
    return ["--model", "gemtest-micro", "--pretrained", checkpoint, "--model-config",
            "tests/data/models/gemtest-micro.json", "--depth", "3", "--input-size", "96", "--batch-size", "2",
            "--cpus-per-worker", "0.5", "--no-progress"]


def test_ray_job_submit_runs_the_example_config(ray_head, micro_checkpoint, tmp_path):
    write_shards(tmp_path / "in", shards=2, per_shard=4)
    out = tmp_path / "labels"
    log = submit(ray_head, "--config", "jobs/configs/local.yaml", "--input", str(tmp_path / "in" / "*.tar"),
                 "--output", str(out), *micro_model_args(micro_checkpoint))
    assert "2 labelled" in log and "Connected to Ray cluster" in log
    rows = all_rows(str(out))
    assert len(rows) == 8 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        check_labels(row)
    settings = json.loads((out / "_config.json").read_text())["settings"]
    assert settings["vocab"][:3] == ["person", "dog", "cat"] and len(settings["templates"]) == 80


def test_scheduled_runs_label_only_new_shards(ray_head, micro_checkpoint, base_config, tmp_path):
    config = {**base_config, "input": [str(tmp_path / "incoming" / "*.tar")], "output": str(tmp_path / "labels")}
    config_path = tmp_path / "nightly.yaml"
    config_path.write_text(yaml.safe_dump(config))
    write_shards(tmp_path / "incoming", shards=2, per_shard=3, stem="day1")
    submit(ray_head, "--config", str(config_path))
    layout = OutputLayout(config["output"])
    first = read_markers(layout)

    write_shards(tmp_path / "incoming", shards=2, per_shard=3, stem="day2")  # the folder grows
    log = submit(ray_head, "--config", str(config_path))
    assert "2 of 4 shards to label" in log
    second = read_markers(layout)
    assert set(first) < set(second) and len(second) == 4
    assert all(second[shard]["finished_at"] == marker["finished_at"] for shard, marker in first.items())
    runs = sorted(read_runs(layout), key=lambda r: r["started_at"])
    assert [(r["shards_done"], r["shards_skipped"], r["shards_failed"]) for r in runs] == [(2, 0, 0), (2, 2, 0)]
    assert all(r["images"] == 6 and r["images_per_s"] > 0 and r["finished_at"] > r["started_at"] for r in runs)
    assert len(all_rows(config["output"])) == 12


def _entrypoint_config(entrypoint: str) -> Path:
    """`python -m jobs.label --config /app/X` -> the repo file X (the image copies the repo to /app)."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.label"], entrypoint
    assert (REPO / "jobs" / "label.py").is_file()
    path = argv[argv.index("--config") + 1]
    return REPO / re.sub(r"^/app/", "", path)


def test_manifests_parse_and_name_what_exists():
    rayjob = yaml.safe_load((REPO / "infra/kuberay/rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["shutdownAfterJobFinishes"] is True
    config_path = _entrypoint_config(rayjob["spec"]["entrypoint"])
    assert config_path.is_file()
    config = load_config(str(config_path))
    assert config.device == "cuda" and config.output.startswith("s3://")
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"])

    cluster = yaml.safe_load((REPO / "infra/kuberay/raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in cluster["spec"]["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])

    documents = list(yaml.safe_load_all((REPO / "infra/kuberay/cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    pod = kinds["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "kubectl create -f /manifests/rayjob.yaml" in pod["containers"][0]["args"][0]
    assert pod["volumes"][0]["configMap"]["name"] == "gemlabel-rayjob"
    assert "rayjobs" in kinds["Role"]["rules"][0]["resources"]

    launcher = yaml.safe_load((REPO / "infra/cluster-launcher/aws.yaml").read_text())
    assert launcher["provider"]["type"] == "aws" and launcher["head_node_type"] in launcher["available_node_types"]
    assert launcher["docker"]["image"] == rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]

    dockerfile = (REPO / "infra/Dockerfile").read_text()
    base_ray = re.search(r"FROM rayproject/ray:([\d.]+)", dockerfile).group(1)
    assert base_ray == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    for source in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", dockerfile, re.M):
        for name in source.split():
            assert (REPO / name).exists(), name
    assert load_config(str(REPO / "jobs/configs/local.yaml")).model == "ViT-B-16"


def test_pack_turns_a_folder_into_shards_gemlabel_reads(tmp_path):
    from jobs.cli import main
    from pipeline.reader import iter_tar_samples
    assert main(["pack", str(REPO / "tests/data/voc"), str(tmp_path / "shards/voc"), "--per-shard", "3",
                 "--pattern", "*_image.png"]) == 0
    shards = sorted((tmp_path / "shards").glob("voc-*.tar"))
    keys = [s["__key__"] for shard in shards for s in iter_tar_samples(str(shard))]
    assert len(shards) == 2 and keys == ["0_image", "114_image", "166_image", "23_image"]
    assert main(["pack", str(tmp_path / "shards"), str(tmp_path / "none")]) == 2
