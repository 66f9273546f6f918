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
from pipeline.store.layout import OutputLayout, read_runs
from pipeline.io.storage import Location
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
    from pipeline.driver import cluster
    monkeypatch.setattr(cluster, "autoscaler_present", lambda: True)  # no autoscaler can run on this machine
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
    from pipeline.driver.cluster import NAMESPACE
    from pipeline.driver.pool import WORKER_PREFIX
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
    (run,) = read_runs(OutputLayout(Location(config["output"])))
    assert run["actor_restarts"] == 1 and run["shards_done"] == 2 and run["status"] == "ok"


# ---- C: bad paths, files and options: one line, exit 2, nothing written ----

def run_label(config: dict, capsys, *extra) -> str:
    assert main([*label_args(config), *extra]) == 2
    return one_line_error(capsys)


def test_output_that_is_a_file_or_under_one(base_config, shards, tmp_path, capsys):
    afile = tmp_path / "taken.txt"
    afile.write_text("not a folder")
    assert "is a file" in run_label({**base_config, "input": shards, "output": str(afile)}, capsys)
    message = run_label({**base_config, "input": shards, "output": str(afile / "labels" / "v1")}, capsys)
    assert f"is under {afile}, which is a file" in message
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("content, message", [
    ("caf\xe9\ndog\n".encode("latin-1"), "is not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
])
def test_vocab_file_that_is_not_text(base_config, shards, tmp_path, capsys, content, message):
    vocab = tmp_path / "classes.txt"
    vocab.write_bytes(content)
    config = {**base_config, "input": shards}
    args = [a for a in label_args(config)]
    args[args.index("--vocab"):args.index("--vocab") + 2] = ["--vocab-file", str(vocab)]
    assert main(args) == 2
    assert message in one_line_error(capsys) and not Path(config["output"]).exists()


def test_vocab_file_missing_on_s3_or_unreachable_over_http(base_config, shards, s3_endpoint, capsys):
    import s3fs
    from tests.conftest import S3_CREDENTIALS, free_port
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS).mkdir("vocabs")
    config = {**base_config, "input": shards}
    options = json.dumps({"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}})
    for url, message in (("s3://vocabs/missing.txt", "vocab_file: no such file s3://vocabs/missing.txt"),
                         (f"http://127.0.0.1:{free_port()}/classes.txt", "vocab_file: cannot read http://127.0.0.1")):
        args = label_args(config)
        args[args.index("--vocab"):args.index("--vocab") + 2] = ["--vocab-file", url]
        start = time.monotonic()
        assert main([*args, "--storage-options", options]) == 2
        assert message in one_line_error(capsys) and time.monotonic() - start < 30
    assert not Path(config["output"]).exists()


def test_storage_options_in_yaml_flow_syntax_as_the_docs_write_them(base_config, shards, s3_endpoint, capsys):
    """`--storage-options '{s3: {endpoint_url: ...}}'` (YAML flow, as the docs write it) reaches
    the store as JSON does: here the vocab file is looked up on it, and found missing there."""
    import s3fs
    from tests.conftest import S3_CREDENTIALS
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS).mkdir("flow")
    args = label_args({**base_config, "input": shards})
    args[args.index("--vocab"):args.index("--vocab") + 2] = ["--vocab-file", "s3://flow/missing.txt"]
    flow = f"{{s3: {{endpoint_url: {s3_endpoint}, key: testing, secret: testing}}}}"
    assert main([*args, "--storage-options", flow]) == 2
    assert "vocab_file: no such file s3://flow/missing.txt" in one_line_error(capsys)


def test_no_progress_help_says_what_it_turns_off(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-progress turns off what is on by default: a progress bar" in text
    assert "one line per shard) (default: true)" not in text


def test_model_config_not_json_and_config_folder(base_config, shards, tmp_path, capsys):
    broken = tmp_path / "model.json"
    broken.write_text('{"embed_dim": 64, "vision_cfg": {')
    assert "model_config: " + str(broken) + " is not valid JSON" in run_label(
        {**base_config, "input": shards, "model_config": str(broken)}, capsys)
    assert main(["label", "--config", str(tmp_path)]) == 2
    assert "is a folder, not a file; give a YAML file" in one_line_error(capsys)


@pytest.mark.parametrize("options, message", [
    ('{"s3": "http://127.0.0.1:9000"}', "storage_options.s3: expected a mapping, got 'http://127.0.0.1:9000'"),
    ("[1, 2]", "storage_options: expected a mapping"),
    ('{"s3": {"endpont_url": "http://127.0.0.1:9000"}}', "storage_options.s3: unknown key endpont_url for the s3"),
    ('{"file": {"auto_mkdirs": true}}', "storage_options.file: unknown key auto_mkdirs"),
    ("{s3: x}", "storage_options.s3: expected a mapping, got 'x'"),
    ("{s3: [", "storage_options: --storage-options expects a mapping in JSON or YAML flow syntax, e.g. '{s3: "),
])
def test_malformed_storage_options(base_config, shards, capsys, options, message):
    assert message in run_label({**base_config, "input": shards}, capsys, "--storage-options", options)


def test_malformed_storage_options_in_yaml(base_config, shards, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**base_config, "input": shards, "storage_options": "s3"}))
    assert main(["label", "--config", str(path)]) == 2
    assert "storage_options: expected a mapping, got 's3'" in one_line_error(capsys)


def test_report_on_s3_without_endpoint_is_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "report", "s3://some-bucket/labels"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gemlabel: error: cannot read s3://some-bucket/labels: ") and "--s3-endpoint" in lines[0]


def test_changed_config_is_refused_before_ray_starts(base_config, shards, capsys):
    """An output claimed with other settings is refused from its ``_config.json`` before the driver
    starts or joins Ray: given a Ray address where nothing answers, the refusal is what is said."""
    from tests.conftest import free_port
    from pipeline.config import load_config
    from pipeline.driver.plan import build_spec
    from pipeline.store.layout import prepare_output
    config = {**base_config, "input": shards}
    other = build_spec(load_config(None, {**config, "vocab": ["cat", "dog"]}))
    layout = OutputLayout(Location(config["output"]))
    prepare_output(layout, other.fingerprint, other.source, overwrite=False, run_id="labelling-now")
    start = time.monotonic()
    assert main([*label_args(config), "--ray-address", f"127.0.0.1:{free_port()}"]) == 2
    message = one_line_error(capsys)
    assert "holds labels made with other settings" in message and "changed: vocab" in message, message
    assert time.monotonic() - start < 20
    assert not layout.runs_dir.exists()  # refused: no run record


# ---- E: what only a worker found before, found by the driver before Ray starts ----

@pytest.mark.parametrize("flags, message", [
    (["--depth", "5"], "gem.depth: gemtest-micro has 4 blocks, so depth must be at most 4; got 5"),
    (["--input-size", "16"], "input_size: gemtest-micro uses 32-pixel patches, so each side must be a multiple "
                             "of 32 (at least 32); got [16, 16]"),
    (["--input-size", "128", "100"], "input_size: gemtest-micro uses 32-pixel patches"),
    (["--templates", "a photo of a {0}."], "templates: 'a photo of a {0}.' is neither a built-in set"),
    (["--templates", "a {} of a {0}."], "no other {...} field"),
    (["--templates", "a {} photo of {name}"], "no other {...} field"),
])
def test_model_dependent_settings_checked_in_the_driver(base_config, shards, capsys, flags, message):
    config = {**base_config, "input": shards}
    start = time.monotonic()
    assert message in run_label(config, capsys, *flags)
    assert time.monotonic() - start < 20 and not Path(config["output"]).exists()  # before Ray, nothing written


def test_corrupt_checkpoint_checked_in_the_driver(base_config, shards, micro_checkpoint, tmp_path, capsys):
    data = Path(micro_checkpoint).read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        config = {**base_config, "input": shards, "pretrained": str(tmp_path / name)}
        message = run_label(config, capsys)
        assert message.startswith(f"gemlabel: error: model: pretrained {tmp_path / name} is not a readable "
                                  "checkpoint")
        assert not Path(config["output"]).exists()


# ---- F: vocabulary ----

def test_vocabulary_items_comments_and_case(base_config, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.driver.plan import resolve_vocabulary
    config = load_config(None, {**base_config, "input": ["a.tar"], "vocab": ["pepper, sweet", "dog"]})
    assert resolve_vocabulary(config) == ["pepper, sweet", "dog"]  # a YAML item is one class
    vocab = tmp_path / "classes.txt"
    vocab.write_text("# animals\ndog   # the pet\ncat#x\n  # indented comment\nsweet pepper\n", encoding="utf-8")
    config = load_config(None, {**base_config, "input": ["a.tar"], "vocab": [], "vocab_file": str(vocab)})
    assert resolve_vocabulary(config) == ["dog", "cat", "sweet pepper"]
    (tmp_path / "a.tar").write_bytes(b"")
    assert main(["label", "--input", str(tmp_path / "a.tar"), "--output", str(tmp_path / "o"),
                 "--vocab", "Dog,cat,dog"]) == 2
    assert "repeats class names (case-insensitively): ['Dog', 'dog']" in one_line_error(capsys)


# ---- G: Ctrl-C ----

@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])  # SIGTERM: issue 18.13 (was rc -6, a C++ stack dump)
def test_sigint_prints_one_line_and_a_rerun_finishes(base_config, tmp_path, signum):
    import signal
    from pipeline.store.layout import read_markers
    shards = [str(p) for p in write_shards(tmp_path / "in", shards=6, per_shard=6)]
    config = {**base_config, "input": shards, "batch_size": 2}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own cluster, not one another process started here
    driver = subprocess.Popen([sys.executable, "-m", "jobs.label", "--config", str(path)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    layout = OutputLayout(Location(config["output"]))
    lines: list[str] = []  # the driver's stderr: one line per shard it has counted as done
    pump = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
    pump.start()
    deadline = time.monotonic() + 240
    while not any(" images, " in line for line in list(lines)) and driver.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(getattr(signal, signum))
    try:
        driver.wait(timeout=120)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # a local Ray the driver may leave behind
        except ProcessLookupError:
            pass
    pump.join(30)
    stderr = "".join(lines)
    assert driver.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("gemlabel: interrupted: ") and "rerun the same command" in last
    done = int(last.split(": ")[2].split(" ")[0])
    assert done >= 1 and len(read_markers(layout)) >= done
    (run,) = read_runs(layout)
    assert run["status"] == "interrupted"
    rerun = subprocess.run([sys.executable, "-m", "jobs.label", "--config", str(path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(read_markers(layout)) == 6 and "6 total" in rerun.stdout  # the summary is on stdout


# ---- H: newcomer fixes ----

@pytest.mark.usefixtures("ray_session")
def test_model_error_in_the_workers_is_exit_2_and_recorded(base_config, shards, tmp_path, capsys):
    """A checkpoint that is a whole file but not this model's passes the driver's checks and fails
    in every worker's constructor: exit 2 with the worker's error, and the run record says so."""
    import torch
    wrong = tmp_path / "other-model.pt"
    torch.save({"not_a_layer.weight": torch.zeros(3)}, wrong)
    config = {**base_config, "input": shards, "pretrained": str(wrong)}
    assert main(label_args(config)) == 2
    *said, message = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert said == [f"gemlabel: starting 1 worker(s); each loads model gemtest-micro (pretrained: {wrong})"]  # a phase
    assert message.startswith("gemlabel: error: ")
    assert message.startswith("gemlabel: error: workers could not start: ")
    (run,) = read_runs(OutputLayout(Location(config["output"])))
    assert run["status"] == "error" and run["error"].startswith("workers could not start") and run["shards_done"] == 0


@pytest.mark.usefixtures("ray_session")
def test_report_counts_pending_shards_given_the_input(base_config, tmp_path, capsys):
    paths = [str(p) for p in write_shards(tmp_path / "in", shards=3, per_shard=2)]
    config = {**base_config, "input": paths[:2]}
    assert main(label_args(config)) == 0
    summary = capsys.readouterr()
    assert "3 total" not in summary.out and "2 total, 2 labelled" in summary.out  # the summary is on stdout
    assert "2 total" not in summary.err
    assert main(["report", config["output"], "--input", str(tmp_path / "in" / "*.tar")]) == 0
    assert "2 done, 0 failed, 0 missing, 0 with image errors, 1 pending (of the given input)" in capsys.readouterr().out
    assert main(["report", config["output"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_pending"] is None


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
def test_a_local_run_shows_no_ray_token_notices_and_says_each_phase(base_config, shards, tmp_path):
    """With RAY_AUTH_MODE unset (as a new user has it), Ray's notices about the token it enables
    for the local cluster do not appear; the model load and the prompts' encoding are said."""
    import shutil
    import tempfile
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp)
    config = {**base_config, "input": shards}
    try:
        result = subprocess.run([sys.executable, "-m", "jobs.cli", *label_args(config)], capture_output=True,
                                text=True, cwd=REPO, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert "authentication token" not in result.stderr.lower(), result.stderr
    assert "gemlabel: 1 worker(s) loaded the model in " in result.stderr
    assert "gemlabel: text embeddings: 4 prompts encoded in " in result.stderr


def test_offline_check_goes_through_the_https_proxy(monkeypatch):
    """With HTTPS_PROXY set, the reachability check asks the proxy (CONNECT), as downloads do."""
    import socket
    from gem.loading import _reachable
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen = []

    def proxy_once():
        conn, _ = server.accept()
        seen.append(conn.recv(4096).decode("latin-1").splitlines()[0])
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=proxy_once, daemon=True)
    thread.start()
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.getsockname()[1]}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert _reachable("weights.example.invalid", timeout=20) is False  # the proxy refused the tunnel
    thread.join(20)
    server.close()
    assert seen and seen[0].startswith("CONNECT weights.example.invalid:443 HTTP/")


# ---- D: object-store outage mid-run, stalled HTTP ----

class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of a server; stop() cuts every connection at once, as an
    outage would, and a new TcpProxy on the same port brings the service back."""

    def __init__(self, target_port: int, port: int = 0):
        import socket
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections: list = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def stop(self) -> None:
        import socket
        self.running = False
        self.listener.close()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
@pytest.mark.usefixtures("ray_session")
def test_object_store_outage_mid_run(base_config, s3_endpoint, tmp_path, capsys):
    import s3fs
    from pipeline.store.layout import read_markers
    from tests.conftest import S3_CREDENTIALS
    from tests.outputs import read_tables
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS).mkdir("outage")
    paths = [str(p) for p in write_shards(tmp_path / "in", shards=4, per_shard=4)]
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    options = {"s3": {"endpoint_url": f"http://127.0.0.1:{proxy.port}", **S3_CREDENTIALS,  # fail fast when down
                      "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}}
    config = {**base_config, "input": paths, "output": "s3://outage/run", "batch_size": 2, "max_shard_retries": 0}
    args = [*label_args(config), "--storage-options", json.dumps(options), "--max-shard-retries", "0"]
    layout = OutputLayout(Location(config["output"], options))
    codes = []
    driver = threading.Thread(target=lambda: codes.append(main(args)))
    driver.start()
    deadline = time.monotonic() + 240
    while not read_markers(layout) and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.stop()  # storage goes away with shards in flight ...
    err, out = "", ""
    while "cannot write the run record" not in err and time.monotonic() < deadline:  # ... until the run's end
        captured = capsys.readouterr()
        err, out = err + captured.err, out + captured.out
        time.sleep(0.2)
    assert ": failed" in err  # the shards in flight were recorded as failed
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]), port=proxy.port)  # ... and comes back
    driver.join(300)
    captured = capsys.readouterr()
    err, out = err + captured.err, out + captured.out
    assert codes == [1] and "Traceback" not in err, err  # exit 1, the failed shards listed, no traceback
    (run,) = read_runs(layout)  # the run record was written once storage returned
    assert run["shards_done"] + run["shards_failed"] == 4 and run["status"] == "failed"
    assert run["shards_failed"] >= 1 and "FAILED" in out
    # nothing lost: a rerun labels what failed, and the result equals a clean run's
    assert main(args) == 0
    assert len(read_markers(layout)) == 4
    clean = {**config, "output": str(tmp_path / "clean")}
    assert main(label_args(clean)) == 0
    capsys.readouterr()
    outage_tables, clean_tables = read_tables(config["output"], options), read_tables(clean["output"])
    assert sorted(outage_tables) == sorted(clean_tables)
    for name, table in clean_tables.items():
        assert outage_tables[name].to_pylist() == table.to_pylist()
    proxy.stop()


@pytest.mark.usefixtures("ray_session")
def test_stalled_http_shard_fails_saying_so(base_config, tmp_path, capsys):
    """A server that sends the start of a shard and then nothing: the shard fails within
    read_timeout_s with a message that says it stalled and where; the other shard is labelled."""
    import http.server
    good, stalled = write_shards(tmp_path / "www", shards=2, per_shard=4)
    release = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def do_GET(self):
            if not self.path.endswith(stalled.name):
                return super().do_GET()
            data = stalled.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:1536])
            self.wfile.flush()
            release.wait(120)  # stall with the connection open

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    config = {**base_config, "input": [f"{base}/{good.name}", f"{base}/{stalled.name}"]}
    start = time.monotonic()
    try:
        code = main([*label_args(config), "--read-timeout-s", "3", "--max-shard-retries", "0"])
    finally:
        release.set()
        server.shutdown()
    assert code == 1 and time.monotonic() - start < 120
    out = capsys.readouterr().out
    assert f"FAILED {base}/{stalled.name}: stalled: no data for 3s while reading {base}/{stalled.name}" in out
    assert "1 labelled" in out


class _NotATensor:
    """Pickled into a checkpoint: torch.load(weights_only=True) refuses it, as the workers would."""


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("kind", ["garbage", "pickle", "zip with an object"])
def test_a_checkpoint_the_workers_cannot_load_is_refused_before_anything_is_written(
        base_config, shards, tmp_path, capsys, kind):
    """Issue 18.15: one line naming the file, exit 2, no output folder (was "workers could not
    start: Check the documentation of torch.load..." after _config.json and a run record)."""
    import pickle

    import torch
    bad = tmp_path / "weights.pt"
    if kind == "garbage":
        bad.write_bytes(b"\x00garbage" * 1000)
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"visual.proj": _NotATensor()}, protocol=2))
    else:
        torch.save({"state_dict": {"visual.proj": _NotATensor()}}, bad)
    config = {**base_config, "input": shards, "pretrained": str(bad)}
    assert main(label_args(config)) == 2
    line = one_line_error(capsys)
    assert str(bad) in line and "not a checkpoint the workers can load" in line, line
    assert not os.path.exists(config["output"])
