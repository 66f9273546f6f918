"""gs:// in, gs:// out, end to end: a real GCS-compatible server (gcp-storage-emulator) on loopback,
a real local Ray cluster, real tar shards, the Parquet read back and its RLE decoded by pycocotools."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.config import load_config
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.store.report import summarize_output
from pipeline.driver.run import run_labeling
from pipeline.store.schema import run_metadata_of
from pipeline.io.storage import Location
from tests.conftest import serve_on_loopback
from tests.outputs import all_rows, check_labels, read_tables
from tests.shards import write_shards

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="session")
def gcs_endpoint():
    """The emulator speaks GCS's JSON API (what gcsfs uses) over plain HTTP on 127.0.0.1."""
    from gcp_storage_emulator.server import create_server
    yield from serve_on_loopback(lambda port: create_server("127.0.0.1", port, in_memory=True))


def test_gs_in_gs_out_end_to_end(base_config, gcs_endpoint, tmp_path):
    # What a user passes for a GCS-compatible endpoint: gcsfs's own options under `gs`.
    options = {"gs": {"endpoint_url": gcs_endpoint, "token": "anon", "project": "gemlabel-test"}}
    import gcsfs
    fs = gcsfs.GCSFileSystem(**options["gs"])
    fs.mkdir("raw-images")
    fs.mkdir("labels")
    for path in write_shards(tmp_path / "local", shards=3, per_shard=6):
        fs.put(str(path), f"raw-images/shards/{path.name}")
    fs.pipe_file("labels/vocab.txt", b"person\ndog\nsofa\ncar\n")
    config = load_config(None, {**{k: v for k, v in base_config.items() if k != "vocab"},
                                "vocab_file": "gs://labels/vocab.txt",
                                "input": ["gs://raw-images/shards/shard-{0000..0001}.tar",
                                          "gs://raw-images/shards/shard-0002*"],
                                "output": "gs://labels/run-1", "storage_options": options})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_failed, summary.images) == (3, 0, 18)

    urls = [f"gs://raw-images/shards/shard-{s:04d}.tar" for s in range(3)]
    rows = all_rows("gs://labels/run-1", options)
    assert len(rows) == 18 and len({row["sample_id"] for row in rows}) == 18
    for row in rows:
        index = int(row["key"].split("-")[-1])
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == (96 + 13 * (index % 5), 64 + 11 * (index % 7))
        assert row["labels"]
        check_labels(row)
        for label in row["labels"]:  # decoded independently, as README's example reads them
            mask = mask_utils.decode({"size": label["rle_size"], "counts": label["rle_counts"].encode()})
            assert mask.shape == (row["height"], row["width"]) and int(mask.sum()) == label["area"]
            assert np.asarray(mask)[label["point_y"], label["point_x"]] == 1
    table = next(iter(read_tables("gs://labels/run-1", options).values()))
    assert run_metadata_of(table.schema)["vocab"] == ["person", "dog", "sofa", "car"]
    markers = read_markers(OutputLayout(Location("gs://labels/run-1", options)))
    assert sorted(m["shard"] for m in markers.values()) == urls
    assert sorted(fs.ls("labels/run-1/labels")) == sorted(f"labels/run-1/labels/{n}" for n in read_tables(
        "gs://labels/run-1", options))

    rerun = run_labeling(config)  # a second run over the same gs:// output finds every shard done
    assert (rerun.shards_done, rerun.shards_skipped) == (0, 3)
    report = summarize_output(Location("gs://labels/run-1", options))
    assert (report["shards_done"], report["images"], report["image_errors"]) == (3, 18, 0)
