"""export, show and report reach an output the way label did (issue 18's limitation): the
storage options of --config or --storage-options (S3 keys, an endpoint), not only --s3-endpoint.
A real S3 server (moto) on loopback whose credentials are in the options alone."""
from __future__ import annotations

import json

import pytest
import yaml
from pycocotools.coco import COCO

from jobs.cli import main
from tests.conftest import S3_CREDENTIALS
from tests.known_output import write_known_output


@pytest.fixture(params=["reader-bucket"])
def s3_output(s3_endpoint, tmp_path, monkeypatch, request):
    import s3fs
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    bucket = f"{request.param}-{request.node.name.split('[')[0][-20:].replace('_', '-')}"
    fs.mkdir(bucket)
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    known = write_known_output(f"s3://{bucket}/shards", f"s3://{bucket}/labels", storage_options=options,
                               local_tmp=tmp_path)
    yield f"s3://{bucket}/labels", options, known
    # Filesystems made here without credentials stay in s3fs's instance cache under the endpoint's
    # options; later tests of the same endpoint, with credentials in their environment, would get them.
    s3fs.S3FileSystem.clear_instance_cache()


def test_export_show_report_take_storage_options_and_config(s3_output, tmp_path, capsys):
    output, options, known = s3_output
    as_json = json.dumps(options)
    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"storage_options": options, "vocab": ["ignored"]}))

    dest = tmp_path / "coco"
    assert main(["export", output, "--format", "coco", "--images", "--dest", str(dest), "--no-progress",
                 "--storage-options", as_json]) == 0
    coco = COCO(str(dest / "annotations" / "train.json"))
    assert {image["sample_id"] for image in coco.dataset["images"]} == set(known)
    assert all((dest / "images" / "train" / image["file_name"]).is_file() for image in coco.dataset["images"])

    show = tmp_path / "show"
    assert main(["show", output, "--dest", str(show), "--config", str(config)]) == 0
    picks = json.loads((show / "picks.json").read_text())
    assert sum(1 for p in picks if p["overlay"]) == 3

    capsys.readouterr()
    assert main(["report", output, "--json", "--storage-options", as_json]) == 0
    assert json.loads(capsys.readouterr().out)["shards_done"] == 1

    # Without them the output is unreachable (no credentials anywhere): one line, not a traceback.
    # (A new process has no filesystem made earlier with other tests' environment credentials.)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["report", output, "--s3-endpoint", options["s3"]["endpoint_url"]]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # Malformed options: one line, exit 2, nothing written.
    for command in (["export", output, "--format", "coco", "--dest", str(tmp_path / "x")],
                    ["show", output, "--dest", str(tmp_path / "x")], ["report", output]):
        assert main([*command, "--storage-options", '{"s3": "not a mapping"}']) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("gemlabel: error: storage_options.s3:"), err
        assert main([*command, "--storage-options", "{not json"]) == 2
        assert "expects a mapping in JSON or YAML flow syntax" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_export_folder_on_s3_holds_one_export(s3_output, s3_endpoint):
    """The one-export rule on an object store: another export's files under the prefix are removed."""
    import s3fs
    output, options, known = s3_output
    as_json = json.dumps(options)
    dest = output.replace("/labels", "/exports/yolo")
    for split in ("train", "val"):
        assert main(["export", output, "--format", "yolo-seg", "--dest", dest, "--no-progress",
                     "--storage-options", as_json, "--splits", f"{split}=*"]) == 0
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.invalidate_cache()
    names = [path.split("exports/yolo/", 1)[1] for path in fs.find(dest[len("s3://"):])]
    assert sorted(n for n in names if n.startswith("labels/")) == sorted(
        f"labels/val/{sample_id.replace('/', '__')}.txt" for sample_id in known)
    assert "data.yaml" in names and len([n for n in names if n.startswith("_done/")]) == 1
