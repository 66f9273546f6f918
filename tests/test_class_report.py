"""``gemlabel report``'s per-class statistics and plots, checked against the Parquet files read in
full by pyarrow; and that the statistics read the class/score/area columns only, not the masks."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jobs.cli import main
from pipeline.store.class_stats import BINS
from tests.known_output import CLASSES, write_known_output


@pytest.fixture
def output(tmp_path) -> str:
    """Three shards; the first one's first image scores NaN (an overflowing model)."""
    for i in range(3):
        (tmp_path / f"s{i}").mkdir()
        write_known_output(str(tmp_path / f"s{i}"), str(tmp_path / "out"), images=2 + i, nan_scores=i == 0)
    return str(tmp_path / "out")


def expected_rows(output: str) -> dict[str, dict]:
    rows = [r for f in sorted((__import__("pathlib").Path(output) / "labels").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist() if r["status"] == "ok"]
    pixels = sum(r["width"] * r["height"] for r in rows)
    expected = {}
    for k, name in enumerate(CLASSES):
        labels = [l for r in rows for l in r["labels"] if l["class_id"] == k]
        scores = np.array([l["score"] for l in labels if np.isfinite(l["score"])])
        expected[name] = {"images": sum(any(l["class_id"] == k for l in r["labels"]) for r in rows),
                          "labels": len(labels), "area": sum(l["area"] for l in labels), "pixels": pixels,
                          "scores": scores, "unscored": len(labels) - len(scores), "ok": len(rows)}
    return expected


def test_report_per_class_statistics_and_plots(output, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert main(["report", output, "--json", "--plots", str(plots)]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = expected_rows(output)
    assert [r["name"] for r in report["per_class"]] == CLASSES
    for row in report["per_class"]:
        want = expected[row["name"]]
        assert (row["images"], row["labels"], row["unscored"]) == (want["images"], want["labels"], want["unscored"])
        assert row["image_share"] == round(want["images"] / want["ok"], 4)
        assert row["pixel_share"] == round(want["area"] / want["pixels"], 4)
        assert row["mean_area"] == (round(want["area"] / want["labels"], 1) if want["labels"] else None)
        for q in (0.1, 0.5, 0.9):
            got = row[f"score_p{int(q * 100)}"]
            if not len(want["scores"]):
                assert got is None
            else:  # the histogram's quantile: within one bin of the exact one
                assert abs(got - np.quantile(want["scores"], q, method="inverted_cdf")) <= 1 / BINS
    person = report["per_class"][0]
    assert person["labels"] == 0 and person["score_p50"] is None  # in the vocabulary, never found
    assert sum(r["unscored"] for r in report["per_class"]) == 3  # the NaN image's three labels
    assert sorted(p.rsplit("/", 1)[-1] for p in report["plots"]) == ["classes.png", "scores.png"]
    for name in ("classes.png", "scores.png"):
        with Image.open(plots / name) as picture:
            assert picture.width > 300 and picture.height > 200
    assert main(["report", output]) == 0
    text = capsys.readouterr().out
    assert "never found: person" in text and text.index("dog ") < text.index("person ")


def test_report_flags_refuse_bad_combinations_and_skip_classes(output, tmp_path, capsys):
    assert main(["report", output, "--no-classes", "--plots", str(tmp_path / "p")]) == 2
    assert "--no-classes" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["report", output, "--no-classes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"] is None


def test_class_statistics_read_no_masks(tmp_path, monkeypatch, capsys):
    """Masks are most of a Parquet file's bytes (noise masks here); the statistics read a small
    part of it (the footer, whose first read is pyarrow's 64 KiB from the end, and six columns)."""
    import tests.known_output as known
    rng = np.random.default_rng(0)
    monkeypatch.setattr(known, "blob_masks", lambda i: {c: rng.random((120, 160)) < 0.5 for c in (1, 2, 3)})
    (tmp_path / "s").mkdir()
    write_known_output(str(tmp_path / "s"), str(tmp_path / "out"), images=64)
    parquet = next((tmp_path / "out" / "labels").glob("*.parquet"))
    read = {"bytes": 0}
    original = LocalFileSystem._open

    def counting_open(self, path, mode="rb", **kwargs):
        handle = original(self, path, mode, **kwargs)
        if str(path).endswith(".parquet"):
            real_read = handle.read
            def read_counted(*args):
                data = real_read(*args)
                read["bytes"] += len(data)
                return data
            handle.read = read_counted
        return handle
    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    assert main(["report", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"][1]["labels"] == 64
    assert 0 < read["bytes"] < 0.1 * parquet.stat().st_size


def test_report_per_class_and_plots_on_s3(s3_endpoint, tmp_path, monkeypatch, capsys):
    import s3fs
    from tests.conftest import S3_CREDENTIALS
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("report-bucket")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    write_known_output("s3://report-bucket/shards", "s3://report-bucket/labels", storage_options=options,
                       local_tmp=tmp_path)
    assert main(["report", "s3://report-bucket/labels", "--s3-endpoint", s3_endpoint, "--json",
                 "--plots", "s3://report-bucket/plots"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["images"]) for r in report["per_class"]] == [("person", 0), ("dog", 3), ("sofa", 3),
                                                                       ("car", 3)]
    fs.invalidate_cache()
    assert sorted(fs.ls("report-bucket/plots")) == ["report-bucket/plots/classes.png", "report-bucket/plots/scores.png"]


def test_a_parquet_file_damaged_after_its_marker_is_missing_and_the_rest_counted(output, capsys):
    from pathlib import Path
    files = sorted((Path(output) / "labels").glob("*.parquet"))
    victim = files[0]
    kept_labels = sum(len(r["labels"]) for f in files[1:] for r in pq.read_table(f).to_pylist())
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size: the markers-only check passes it
    assert main(["report", output, "--no-classes", "--json"]) == 0
    capsys.readouterr()
    assert main(["report", output, "--json"]) == 1  # as for any missing shard: a rerun relabels it
    report = json.loads(capsys.readouterr().out)
    assert report["shards_done"] == 2 and report["shards_missing"] == 1
    assert "Parquet file unreadable" in next(iter(report["missing_shards"].values()))
    assert sum(r["labels"] for r in report["per_class"]) == kept_labels  # the other two shards' labels
