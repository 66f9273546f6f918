"""Credentials given to a run are written and printed nowhere (issue 18.9): a password and
presigned-style tokens in input URLs, S3 keys, a bearer header; shard ids ignore them."""
import http.server
import json
import threading
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.io.redact import redact_text, redact_url
from pipeline.io.shards import shard_id_for
from tests.conftest import S3_CREDENTIALS
from tests.shards import write_shards

PLANTED = ("PASSWD-PLANTED", "SIG-PLANTED", "TOKEN-PLANTED", "KEYID-PLANTED", "SECRET-PLANTED", "BEARER-PLANTED",
           "SIG-RENEWED")


def test_redaction_keeps_the_file_and_drops_the_credentials():
    assert redact_url("http://u:p@h:1/a/x.tar?X-Amz-Signature=s&v=2&token=t") == "http://***@h:1/a/x.tar?X-Amz-Signature=***&v=2&token=***"
    assert redact_url("s3://bucket/x.tar") == "s3://bucket/x.tar" and redact_url("/data/a@b.tar") == "/data/a@b.tar"
    assert shard_id_for("http://u:p@h/x.tar?sig=1") == shard_id_for("http://u:q@h/x.tar?sig=2") == shard_id_for("http://***@h/x.tar?sig=***")
    assert shard_id_for("/data/x.tar") == "x-" + __import__("hashlib").sha1(b"/data/x.tar").hexdigest()[:8]  # unchanged ids
    assert redact_text("url=URL('https://a:b@h/x?sig=zz&x=1') failed") == "url=URL('https://***@h/x?sig=***&x=1') failed"


def _serve(folder: Path):
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            seen.append(self.headers.get("X-Auth"))
            self.path = self.path.split("?", 1)[0]
            return super().do_GET()

        def do_HEAD(self):
            self.path = self.path.split("?", 1)[0]
            return super().do_HEAD()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _everything_written(output: str, options: dict) -> str:
    """Every object under the output, raw and (Parquet) decoded, as one text."""
    import io

    import pyarrow.parquet as pq
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": options["s3"]["endpoint_url"]}, **S3_CREDENTIALS)
    texts = []
    for path in fs.find(output):
        data = fs.cat_file(path)
        texts.append(data.decode("latin-1"))
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            texts.append(json.dumps(table.to_pylist(), default=str))
            texts.append(str(table.schema.metadata))
    return "\n".join(texts)


def _ray_logs() -> str:
    import ray
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())


@pytest.mark.usefixtures("ray_session")
def test_planted_secrets_appear_in_no_written_file_output_or_log(base_config, s3_endpoint, tmp_path, capsys, caplog):
    import s3fs
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS).mkdir("secrets")
    write_shards(tmp_path / "www", shards=1, per_shard=3)
    server, seen = _serve(tmp_path / "www")
    host = f"127.0.0.1:{server.server_address[1]}"
    signed = "?X-Amz-Credential=KEYID-PLANTED&X-Amz-Signature={}&token=TOKEN-PLANTED"
    good = f"http://user:PASSWD-PLANTED@{host}/shard-0000.tar" + signed.format("SIG-PLANTED")
    missing = f"http://user:PASSWD-PLANTED@{host}/gone.tar" + signed.format("SIG-PLANTED")
    options = {"s3": {"endpoint_url": s3_endpoint, "key": "KEYID-PLANTED", "secret": "SECRET-PLANTED"},
               "http": {"headers": {"X-Auth": "Bearer BEARER-PLANTED"}}}  # aiohttp: Authorization is the userinfo
    args = ["label", "--output", "s3://secrets/run", "--vocab", ",".join(base_config["vocab"]),
            "--model", base_config["model"], "--pretrained", base_config["pretrained"],
            "--model-config", base_config["model_config"], "--depth", "3", "--input-size", "64", "64",
            "--batch-size", "4", "--cpus-per-worker", "0.5", "--no-progress", "--max-shard-retries", "0",
            "--storage-options", json.dumps(options)]
    try:
        first = main([*args, "--input", good, missing])
        renewed = main([*args, "--input", good.replace("SIG-PLANTED", "SIG-RENEWED")])
    finally:
        server.shutdown()
    captured = capsys.readouterr()
    assert first == 1 and renewed == 0, captured.err
    assert "1 labelled" in captured.out and "FAILED http://***@" in captured.out
    assert "0 labelled, 1 already done" in captured.out  # a renewed signature names the same shard
    assert "Bearer BEARER-PLANTED" in seen  # the header was used ...
    written = _everything_written("secrets/run", options)
    assert f"http://***@{host}/shard-0000.tar?X-Amz-Credential=***&X-Amz-Signature=***&token=***" in written
    for where, text in (("output", written), ("stdout", captured.out), ("stderr", captured.err),
                        ("log", caplog.text), ("Ray logs", _ray_logs())):
        found = [secret for secret in PLANTED if secret in text]
        assert not found, f"{found} in {where}"  # ... and is nowhere else
