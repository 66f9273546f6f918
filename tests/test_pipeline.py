"""The labeling pipeline on a real local Ray cluster, real tar shards, a real S3 server (moto)."""
import threading
import time
from pathlib import Path

import pytest
import ray
import s3fs

from pipeline.config import ConfigError, load_config
from pipeline.store.layout import OutputLayout, read_failures, read_markers
from pipeline.store.report import summarize_output
from pipeline.driver.cluster import NAMESPACE
from pipeline.driver.pool import WORKER_PREFIX
from pipeline.driver.run import run_labeling
from pipeline.store.schema import run_metadata_of
from pipeline.io.shards import shard_id_for
from pipeline.io.storage import Location
from tests.conftest import S3_CREDENTIALS
from tests.outputs import all_rows, check_labels, read_tables
from tests.shards import encode, photo, truncate, varied_samples, write_shard, write_shards

pytestmark = pytest.mark.usefixtures("ray_session")


def expected_ids(shards: list[str], per_shard: int) -> set[str]:
    return {f"{shard_id_for(url)}/s{s}-{i:05d}" for s, url in enumerate(shards) for i in range(per_shard)}


def test_s3_in_s3_out_end_to_end(base_config, s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, **S3_CREDENTIALS)
    fs.mkdir("raw-images")
    options = {"s3": {"endpoint_url": s3_endpoint, **S3_CREDENTIALS}}
    with pytest.raises(ConfigError, match="bucket does not exist"):
        run_labeling(load_config(None, {**base_config, "input": [str(tmp_path)], "output": "s3://no-bucket/x",
                                        "storage_options": options}))
    fs.mkdir("labels")
    for path in write_shards(tmp_path / "local", shards=3, per_shard=8):
        fs.put(str(path), f"raw-images/shards/{path.name}")
    config = load_config(None, {**base_config, "input": ["s3://raw-images/shards/shard-{0000..0001}.tar",
                                                        "s3://raw-images/shards/shard-0002*"],
                                "output": "s3://labels/run-1", "storage_options": options})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_failed, summary.images) == (3, 0, 24)

    urls = [f"s3://raw-images/shards/shard-{s:04d}.tar" for s in range(3)]
    rows = all_rows("s3://labels/run-1", options)
    ids = [row["sample_id"] for row in rows]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(urls, 8)  # each image exactly once
    for row in rows:
        index = int(row["key"].split("-")[-1])
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == (96 + 13 * (index % 5), 64 + 11 * (index % 7))
        assert row["labels"]
        check_labels(row)
    table = next(iter(read_tables("s3://labels/run-1", options).values()))
    metadata = run_metadata_of(table.schema)
    assert metadata["vocab"] == ["person", "dog", "sofa", "car"] and metadata["gem"]["depth"] == 3
    assert metadata["schema_version"] == 1 and metadata["templates"] == ["a photo of a {}."]
    markers = read_markers(OutputLayout(Location("s3://labels/run-1", options)))
    assert sorted(m["shard"] for m in markers.values()) == urls
    assert all(m["timings"]["model_s"] > 0 for m in markers.values())
    report = summarize_output(Location("s3://labels/run-1", options))
    assert (report["shards_done"], report["images"], report["image_errors"]) == (3, 24, 0)
    assert all(m["input"]["etag"] and m["parquet_bytes"] > 0 for m in markers.values())
    assert run_labeling(config).shards_skipped == 3  # etags and Parquet sizes match: nothing to redo
    fs.put(str(tmp_path / "local" / "shard-0000.tar"), "raw-images/shards/shard-0001.tar")  # replaced
    assert run_labeling(config).shards_done == 1


def test_bad_images_become_error_rows_and_bad_shards_fail_alone(base_config, tmp_path):
    good = write_shards(tmp_path / "in", shards=2, per_shard=6)
    jpeg = encode(photo(2, (80, 60)), "JPEG")
    mixed = write_shard(tmp_path / "in" / "mixed.tar", [
        {"__key__": "ok-1", "jpg": jpeg},
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 3]},
        {"__key__": "garbage", "jpg": b"\xff\xd8 not really"},
        {"__key__": "caption-only", "txt": b"no picture here"},
        {"__key__": "ok-2", "png": encode(photo(3, (40, 90)), "PNG")},
    ])
    truncated = write_shard(tmp_path / "in" / "truncated.tar", varied_samples(6, prefix="t-"))
    truncate(truncated, 0.4)
    missing = tmp_path / "in" / "missing.tar"
    config = load_config(None, {**base_config, "max_shard_retries": 1,
                                "input": [*map(str, good), str(mixed), str(truncated), str(missing)]})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_failed, summary.shard_retries) == (3, 2, 2)
    assert set(summary.failed) == {str(truncated), str(missing)}

    rows = {row["key"]: row for row in all_rows(config.output)}
    assert len(rows) == 12 + 5
    assert [rows[k]["status"] for k in ("ok-1", "truncated", "garbage", "caption-only", "ok-2")] == \
        ["ok", "error", "error", "error", "ok"]
    assert "no image" in rows["caption-only"]["error"] and rows["garbage"]["labels"] == []
    layout = OutputLayout(config.location(config.output))
    marker = read_markers(layout)[shard_id_for(str(mixed))]
    assert marker["errors"] == 3 and marker["error_histogram"]["no_image"] == 1
    failures = read_failures(layout)
    assert {f["shard"] for f in failures.values()} == {str(truncated), str(missing)}
    assert all(f["attempts"] == 2 for f in failures.values())

    # Repair one shard: the rerun labels only it and clears its failure record.
    write_shard(truncated, varied_samples(6, prefix="t-"))
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_skipped, summary.shards_failed) == (1, 3, 1)
    assert set(read_failures(layout)) == {shard_id_for(str(missing))}

    # --retry-failed also redoes the shard whose samples failed.
    retry = load_config(None, {**base_config, "max_shard_retries": 0, "retry_failed": True,
                               "input": [*map(str, good), str(mixed), str(truncated)]})
    summary = run_labeling(retry)
    assert (summary.shards_done, summary.shards_skipped) == (1, 3)
    assert read_markers(layout)[shard_id_for(str(mixed))]["finished_at"] > marker["finished_at"]


def test_actor_killed_mid_shard_is_redone_elsewhere(base_config, tmp_path):
    shards = write_shards(tmp_path / "in", shards=6, per_shard=24)  # shards left to kill the worker on
    config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "batch_size": 2})
    layout = OutputLayout(config.location(config.output))
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("summary", run_labeling(config)))
    driver.start()
    deadline = time.monotonic() + 120
    while not read_markers(layout) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [n for n in ray.util.list_named_actors() if n.startswith(WORKER_PREFIX)]
    assert len(workers) == 1
    ray.kill(ray.get_actor(workers[0], namespace=NAMESPACE))
    killed_after = len(read_markers(layout))
    driver.join(timeout=300)
    summary = result["summary"]
    assert killed_after < 6  # the actor died with shards left to do
    assert summary.actor_restarts == 1 and summary.shards_done == 6 and summary.shards_failed == 0
    rows = all_rows(config.output)
    ids = [row["sample_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 144 and set(ids) == expected_ids([str(s) for s in shards], 24)
    leftovers = [p for p in Path(config.output).rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_a_worker_overlaps_its_shards_only_when_it_holds_two(base_config, tmp_path):
    """shards_per_worker: 2 (default) lets one Ray worker start the next shard while the last one
    drains (Ray runs two of its calls at once); 1 labels them strictly one after another. The
    labels are the same."""
    write_shards(tmp_path / "in", shards=3, per_shard=16)
    spans, rows = {}, {}
    for slots in (1, 2):
        config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "num_workers": 1,
                                    "output": str(tmp_path / f"out-{slots}"), "shards_per_worker": slots,
                                    "batch_size": 2})
        summary = run_labeling(config)
        assert summary.shards_done == 3 and summary.actor_restarts == 0
        markers = sorted(read_markers(OutputLayout(config.location(config.output))).values(),
                         key=lambda m: m["started_at"])
        spans[slots] = [(m["started_at"], m["finished_at"]) for m in markers]
        rows[slots] = all_rows(config.output)
    overlaps = {slots: sum(later[0] < earlier[1] for earlier, later in zip(s, s[1:])) for slots, s in spans.items()}
    assert overlaps[1] == 0 and overlaps[2] >= 1, spans
    assert rows[1] == rows[2]


def test_reruns_skip_done_shards_and_guard_the_config(base_config, tmp_path):
    write_shards(tmp_path / "in", shards=2, per_shard=4)
    settings = {**base_config, "input": [str(tmp_path / "in" / "*.tar")]}
    first = run_labeling(load_config(None, settings))
    assert first.shards_done == 2
    before = all_rows(settings["output"])
    again = run_labeling(load_config(None, settings))
    assert (again.shards_done, again.shards_skipped) == (0, 2)

    with pytest.raises(ConfigError, match="changed: vocab"):
        run_labeling(load_config(None, {**settings, "vocab": ["cat", "dog"]}))
    with pytest.raises(ConfigError, match="changed: gem.iters"):
        run_labeling(load_config(None, {**settings, "gem": {"depth": 3, "iters": 2}}))
    # Settings that do not change labels (batching, workers) reuse the output.
    assert run_labeling(load_config(None, {**settings, "batch_size": 1})).shards_skipped == 2

    replaced = run_labeling(load_config(None, {**settings, "vocab": ["cat", "dog"], "overwrite": True}))
    assert replaced.shards_done == 2
    after = all_rows(settings["output"])
    assert {r["sample_id"] for r in after} == {r["sample_id"] for r in before}
    assert {label["name"] for r in after for label in r["labels"]} <= {"cat", "dog"}
    assert len(summarize_output(Location(settings["output"]))["runs"]) == 4  # refused runs leave no record


def test_http_input(base_config, tmp_path):
    """Shards served over HTTP (a loopback http.server), read through fsspec's HTTP filesystem."""
    import functools
    import http.server

    write_shards(tmp_path / "www", shards=2, per_shard=3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        config = load_config(None, {**base_config, "input": [f"{base}/shard-{{0000..0001}}.tar", f"{base}/gone.tar"],
                                    "max_shard_retries": 0})
        summary = run_labeling(config)
    finally:
        server.shutdown()
    assert (summary.shards_done, summary.shards_failed, summary.images) == (2, 1, 6)
    assert {row["shard"] for row in all_rows(config.output)} == {f"{base}/shard-0000.tar", f"{base}/shard-0001.tar"}


def test_the_driver_says_each_phase_and_counts_images(base_config, tmp_path):
    """Starting the workers, loading the model, the text embeddings (encoded, then from the cache
    on a rerun over new shards) are each said as they happen; the bar counts images, with their
    rate, and shards beside them."""
    import io
    write_shards(tmp_path / "in", shards=2, per_shard=3)
    settings = {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "progress": True}
    out = io.StringIO()
    run_labeling(load_config(None, settings), out=out)
    text = out.getvalue()
    phases = ["gemlabel: starting 1 worker(s); each loads model gemtest-micro (pretrained: ",
              "gemlabel: 1 worker(s) loaded the model in ", "gemlabel: text embeddings: 4 prompts (4 names x 1 templates)",
              "gemlabel: text embeddings: 4 prompts encoded in ", "gemlabel: 2 of 2 shards to label"]
    positions = [text.find(phase) for phase in phases]
    assert -1 not in positions and positions == sorted(positions), text
    final = text.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("6img [") and "img/s" in final and "shards=2/2" in final, final
    write_shards(tmp_path / "more", shards=1, per_shard=2, stem="more")
    out = io.StringIO()
    run_labeling(load_config(None, {**settings, "input": [*settings["input"], str(tmp_path / "more" / "*.tar")]}),
                 out=out)
    assert "gemlabel: text embeddings read from the cache (no prompts encoded)" in out.getvalue()
    assert "2img [" in out.getvalue() and "shards=1/1" in out.getvalue()
