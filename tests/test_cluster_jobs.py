"""Cluster use: `ray job submit` to a real Ray head, scheduled incremental runs, the manifests."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from pipeline.store.layout import OutputLayout, read_markers, read_runs
from pipeline.io.storage import Location
from tests.conftest import free_port
from tests.outputs import all_rows, check_labels
from tests.ray_heads import BIN, REPO, head_command, ray_env, stop_process_group, wait_for_dashboard
from tests.shards import write_shards
from jobs.ray_ready import wait_until_ready

@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 in its own temp dir and process group (so it neither
    becomes the machine's default cluster nor outlives the tests)."""
    temp_dir = tempfile.mkdtemp(prefix="rgt-", dir="/tmp")
    dashboard = free_port()
    head = subprocess.Popen(
        head_command(free_port(), dashboard, 2, temp_dir,
                     # the job agent's default port (52365) is taken by any other Ray head on the machine
                     f"--dashboard-agent-listen-port={free_port()}"),
        env=ray_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    wait_for_dashboard(address, head)
    assert wait_until_ready(address) is None  # the job agent is up: the submits below never race it
    yield address
    stop_process_group(head, 5, kill_leftovers=True)


def submit(address: str, *job_args: str) -> str:
    result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                             "--", "python", "-m", "jobs.label", *job_args],
                            cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    return result.stdout


def micro_model_args(checkpoint: str) -> list[str]:
    return ["--model", "gemtest-micro", "--pretrained", checkpoint, "--model-config",
            "tests/data/models/gemtest-micro.json", "--depth", "3", "--input-size", "96", "--batch-size", "2",
            "--cpus-per-worker", "0.5", "--no-progress"]


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
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
    example = yaml.safe_load((REPO / "jobs" / "configs" / "local.yaml").read_text())
    assert settings["vocab"] == example["vocab"] and len(settings["templates"]) == 80


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
def test_scheduled_runs_label_only_new_shards(ray_head, micro_checkpoint, base_config, tmp_path):
    config = {**base_config, "input": [str(tmp_path / "incoming" / "*.tar")], "output": str(tmp_path / "labels")}
    config_path = tmp_path / "nightly.yaml"
    config_path.write_text(yaml.safe_dump(config))
    write_shards(tmp_path / "incoming", shards=2, per_shard=3, stem="day1")
    submit(ray_head, "--config", str(config_path))
    layout = OutputLayout(Location(config["output"]))
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


def readme_steps() -> list[list[str]]:
    """The command lines of the fenced blocks of docs/cluster.md's "From a laptop to a cluster", in order."""
    page = (REPO / "docs" / "cluster.md").read_text()
    section = page[page.index("## From a laptop to a cluster"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    return [[line.strip() for line in block.strip().splitlines()]
            for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


@pytest.mark.slow  # two Ray clusters start: 2-3 minutes on 2 cores
def test_readme_steps_1_and_2_run_as_written(micro_checkpoint, tmp_path):
    """A newcomer's checkout (the code, the demo photos, the git-ignored .venv and nothing else),
    a fresh HOME, no RAY_AUTH_MODE, a Ray temp folder of its own (as on a machine with no other Ray):
    docs/cluster.md's step 1 and step 2 lines are run by bash as written. The
    only changes: the model (tests have no weights: the micro model's flags are appended to the two
    label commands), the head's ports (free ones), and the head runs in its own temp dir, in the
    foreground, stopped by its PID (not `ray stop`, which would stop every Ray on the machine)."""
    step1, step2 = readme_steps()[:2]
    project = tmp_path / "gemlabel"
    for folder in ("gem", "pipeline", "jobs", "tests/data/voc"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    (project / ".venv").symlink_to(BIN.parent)  # the Quick start's install
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(home), PWD=str(project), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DEDUP_LOGS="0",
               # step 1's own Ray goes here, and does not find (and join) another Ray of this machine
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rgl-", dir="/tmp"))
    model_args = micro_model_args(micro_checkpoint)
    model_args[model_args.index("--model-config") + 1] = str(REPO / "tests/data/models/gemtest-micro.json")
    model = " " + shlex.join(model_args)

    def run(line: str) -> str:
        if re.search(r"\bgemlabel label\b|-m jobs\.label\b", line):
            line += model
        result = subprocess.run(["bash", "-c", line], cwd=project, env=env, capture_output=True, text=True,
                                timeout=400)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result.stdout + result.stderr

    for line in step1:
        run(line)
    rows = all_rows(str(project / "demo" / "labels"))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert (home / ".ray" / "auth_token").is_file()  # why step 2 says RAY_AUTH_MODE=disabled

    if step2[-1] == "ray stop":  # `ray stop` would stop every Ray of this machine: the head is run apart
        log = _step2_stopping_the_head_by_pid(step2, project, env, run)
    else:
        log = _step2_as_one_script(step2, project, env, model)
    assert "succeeded" in log and "Connected to Ray cluster" in log
    cluster_rows = all_rows(str(project / "demo" / "labels-cluster"))  # the folder the command named
    assert sorted(r["key"] for r in cluster_rows) == sorted(r["key"] for r in rows)
    assert all(row["status"] == "ok" for row in cluster_rows)
    for row in cluster_rows:
        check_labels(row)


def _step2_stopping_the_head_by_pid(step2: list[str], project, env: dict, run) -> str:
    """Step 2 in the form that ends with `ray stop`: its exports, then its head run in the
    foreground (free ports, its own temp dir) and stopped by its PID, then its submit."""
    exports = [line for line in step2 if line.startswith("export ")]
    starts = [line for line in step2 if re.search(r"\bray start --head\b", line)]
    submits = [line for line in step2 if re.search(r"\bray job submit\b", line)]
    assert len(starts) == len(submits) == 1 and len(exports) + 3 == len(step2)
    for line in exports:  # bash evaluates them; the lines after them see the result
        exported = subprocess.run(["bash", "-c", f"{line} && env -0"], cwd=project, env=env, capture_output=True,
                                  check=True).stdout.decode()
        env = dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
    dashboard = free_port()
    assert "--dashboard-port=8265" in starts[0] and "--address http://127.0.0.1:8265" in submits[0]
    head = subprocess.Popen(
        ["bash", "-c", starts[0].replace("--dashboard-port=8265", f"--dashboard-port={dashboard}")
         + f" --port={free_port()} --dashboard-agent-listen-port={free_port()} --num-cpus=2 --disable-usage-stats --block"
         + f" --temp-dir={tempfile.mkdtemp(prefix='rgr-', dir='/tmp')}"],
        cwd=project, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_dashboard(f"http://127.0.0.1:{dashboard}", head)
        # the dashboard answers before the job agent is up: wait for it as python -m jobs.ray_ready does
        assert wait_until_ready(f"http://127.0.0.1:{dashboard}") is None
        # the submit sees the exports as it does in the reader's shell (run() starts a new bash)
        return run(" && ".join([*exports, submits[0].replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}")]))
    finally:
        stop_process_group(head, 5, kill_leftovers=True)


STEP2_PORTS = ("--port=6390", "--dashboard-port=8265", "--dashboard-agent-listen-port=52366")


def _step2_as_one_script(step2: list[str], project, env: dict, model: str) -> str:
    """Step 2 in the form that starts its head in the background, waits with jobs.ray_ready and
    stops that head by its PID: run by bash as one script, as written, but with free ports and
    a temp dir of its own in place of the documented ones (which this machine's other Rays may
    hold), two CPUs, and the micro model's flags after the label command."""
    script = "\n".join(step2)
    assert all(port in script for port in STEP2_PORTS) and "--temp-dir=/tmp/ray-gemlabel" in script, script
    assert "jobs.ray_ready http://127.0.0.1:8265" in script and re.search(r"^kill \$\w+$", step2[-1]), script
    dashboard = free_port()
    for documented in STEP2_PORTS:
        script = script.replace(documented, f"{documented.split('=')[0]}={dashboard if '8265' in documented else free_port()}")
    script = script.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}").replace(
        "--temp-dir=/tmp/ray-gemlabel", f"--temp-dir={tempfile.mkdtemp(prefix='rgr-', dir='/tmp')} --num-cpus=2 "
                                        "--disable-usage-stats")
    script = "\n".join(line + model if re.search(r"-m jobs\.label\b", line) else line for line in script.splitlines())
    process = subprocess.Popen(["bash", "-e", "-c", script], cwd=project, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = process.communicate(timeout=600)
    finally:
        stop_process_group(process, 5, kill_leftovers=True)  # only if the script failed before its `kill`
    assert process.returncode == 0, script + "\n" + log[-4000:]
    return log


def test_ray_ready_waits_for_the_job_agent(ray_head):
    """Right after the dashboard answers, a head may not take jobs yet; jobs.ray_ready returns
    once it has run a job, so the submit after it is taken at the first try."""
    result = subprocess.run([sys.executable, "-m", "jobs.ray_ready", ray_head, "--timeout", "60"], cwd=REPO,
                            env=ray_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip() == f"gemlabel: the Ray head at {ray_head} takes jobs"


def test_ray_ready_says_why_in_one_line_when_no_head_answers():
    address = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jobs.ray_ready", address, "--timeout", "3"], cwd=REPO,
                            env=ray_env(), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gemlabel: error: the Ray head at {address} takes no jobs after 3s: ")
    assert time.monotonic() - start < 60


def test_pack_turns_a_folder_into_shards_gemlabel_reads(tmp_path):
    from jobs.cli import main
    from pipeline.io.tar import iter_tar_samples
    assert main(["pack", str(REPO / "tests/data/voc"), str(tmp_path / "shards/voc"), "--per-shard", "3",
                 "--pattern", "*_image.png"]) == 0
    shards = sorted((tmp_path / "shards").glob("voc-*.tar"))
    keys = [s["__key__"] for shard in shards for s in iter_tar_samples(Location(str(shard)))]
    assert len(shards) == 2 and keys == ["0_image", "114_image", "166_image", "23_image"]
    assert main(["pack", str(tmp_path / "shards"), str(tmp_path / "none")]) == 2
