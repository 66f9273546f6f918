"""The shard worker outside Ray: one failing image never takes its batch or shard with it."""
from collections import Counter

import torch

from pipeline.config import load_config
from pipeline.worker.decode import DecodedSample
from pipeline.driver.plan import build_spec
from pipeline.io.shards import Shard
from pipeline.worker.labeler import ShardLabeler


def test_an_image_the_model_cannot_take_becomes_an_error_row(base_config, tmp_path):
    config = load_config(None, {**base_config, "input": ["unused.tar"]})
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
    good = [DecodedSample(i, f"k{i}", 80, 60, tensor=torch.randn(3, 128, 128)) for i in range(2)]
    bad = DecodedSample(2, "bad", 80, 60, tensor=torch.randn(2, 128, 128))  # two channels
    rows = labeler._rows_for_batch(Shard("s.tar", "s-1"), [good[0], bad, good[1]], timings=Counter())
    assert [(r["key"], r["status"]) for r in rows] == [("k0", "ok"), ("bad", "error"), ("k1", "ok")]
    assert rows[1]["error"].startswith("model: RuntimeError") and rows[1]["_kind"] == "model:RuntimeError"
    assert all(r["labels"] for r in rows if r["status"] == "ok")


def test_overlapped_and_sequential_stages_write_the_same_labels_and_time_every_stage(base_config, tmp_path):
    from dataclasses import replace

    from tests.outputs import all_rows, check_labels
    from tests.shards import varied_samples, write_shard

    samples = varied_samples(13)
    samples[5] = {"__key__": "broken", "jpg": b"not a jpeg"}
    url = str(write_shard(tmp_path / "in/s-0.tar", samples))
    results = {}
    for sequential in (False, True):
        output = str(tmp_path / f"out-{sequential}")
        config = load_config(None, {**base_config, "input": [url], "output": output, "batch_size": 3})
        labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
        labeler.stage_settings = replace(labeler.stage_settings, sequential=sequential)
        marker = labeler.label_shard(Shard(url, "s-0"))
        results[sequential] = [{**row, "error": (row["error"] or "").split(" <")[0]} for row in all_rows(output)]
        assert (marker["samples"], marker["errors"]) == (13, 1)
        stages = ("read_s", "decode_s", "resize_s", "model_s", "postprocess_s", "rle_s", "write_s")
        assert all(marker["timings"][key] > 0 for key in stages), marker["timings"]
        assert {"batch_wait_s", "model_wait_s", "model_blocked_s", "collect_wait_s"} <= set(marker["timings"])
    assert results[False] == results[True]
    assert [row["key"] for row in results[False]] == [s["__key__"] for s in samples]
    for row in results[False]:
        if row["status"] == "ok":
            check_labels(row)


def test_two_shards_at_once_on_one_worker_write_what_one_at_a_time_writes(base_config, tmp_path):
    """As Ray runs a worker holding two shards (max_concurrency 2): the second reads while the
    first drains, the model takes one batch at a time, and both Parquet files equal those of
    shards labelled one after the other."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.outputs import all_rows
    from tests.shards import varied_samples, write_shard

    urls = [str(write_shard(tmp_path / f"in/s-{i}.tar", varied_samples(9, prefix=f"s{i}-"))) for i in range(2)]
    results = {}
    for together in (False, True):
        output = str(tmp_path / f"out-{together}")
        config = load_config(None, {**base_config, "input": urls, "output": output, "batch_size": 2})
        labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
        dense_logits, inside, most = labeler.segmenter.dense_logits, [0], [0]
        lock = threading.Lock()

        def counted(images, vocabulary, dense_logits=dense_logits):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            try:
                return dense_logits(images, vocabulary)
            finally:
                with lock:
                    inside[0] -= 1
        labeler.segmenter.dense_logits = counted
        shards = [Shard(url, f"s-{i}") for i, url in enumerate(urls)]
        with ThreadPoolExecutor(2 if together else 1) as pool:
            markers = list(pool.map(labeler.label_shard, shards))
        assert [m["samples"] for m in markers] == [9, 9] and most[0] == 1
        results[together] = all_rows(output)
        if together:  # the second shard waited for the first one's reading, not for all of it
            first, second = sorted(markers, key=lambda m: m["started_at"])
            assert second["timings"]["read_turn_wait_s"] > 0 and second["started_at"] < first["finished_at"]
    assert results[True] == results[False]


def test_redoing_a_shard_removes_what_a_worker_killed_while_committing_it_left(base_config, tmp_path,
                                                                              monkeypatch):
    """An actor killed between writing a shard's temp file and renaming it leaves the temp file;
    the worker that redoes the shard removes it. Not another shard's, nor one written while the
    attempt ran (a live writer's: another run on the same output)."""
    import time

    import pyarrow.parquet as pq

    from pipeline.store.layout import OutputLayout
    from tests.outputs import leftover_temp
    from tests.shards import varied_samples, write_shard

    url = str(write_shard(tmp_path / "in/s-0.tar", varied_samples(3)))
    config = load_config(None, {**base_config, "input": [url], "output": str(tmp_path / "out")})
    layout = OutputLayout(config.location(config.output))
    expected = {}

    def leave_temp(file, when: float, stays: bool) -> None:
        expected[leftover_temp(file.path, when)] = stays

    for shard_id in ("s-0", "s-1", "s-00"):
        for file in (layout.labels_file(shard_id), layout.marker_file(shard_id)):
            leave_temp(file, time.time() - 3600, stays=shard_id != "s-0")  # a dead writer's
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
    labeler.label_shard(Shard(url, "s-0"))  # a first attempt leaves others' files alone
    assert all(temp.exists() for temp in expected)

    writing = pq.write_table

    def while_labelling(*args, **kwargs):  # another writer of this shard, during the attempt
        time.sleep(0.05)
        for file in (layout.labels_file("s-0"), layout.marker_file("s-0")):
            leave_temp(file, time.time(), stays=True)
        time.sleep(0.05)
        return writing(*args, **kwargs)
    monkeypatch.setattr(pq, "write_table", while_labelling)
    labeler.label_shard(Shard(url, "s-0"), redo=True)
    assert {temp: temp.exists() for temp in expected} == expected
    assert layout.labels_file("s-0").exists() and layout.marker_file("s-0").exists()


def test_jpeg_draft_labels_large_photos_at_their_own_size(base_config, tmp_path):
    """With ``jpeg_draft`` the worker decodes a 1600x1200 JPEG at a reduced scale (1/8 for this
    128x128 input), yet its row, masks and boxes are at 1600x1200; the setting is part of the
    fingerprint only when on (older outputs keep theirs)."""
    from tests.outputs import all_rows, check_labels
    from tests.shards import encode, photo, write_shard

    samples = [{"__key__": f"big{i}", "jpg": encode(photo(i, (1600, 1200)), "JPEG", quality=90)} for i in range(2)]
    url = str(write_shard(tmp_path / "in/s-0.tar", samples))
    config = load_config(None, {**base_config, "input": [url], "output": str(tmp_path / "out"), "jpeg_draft": True})
    ShardLabeler(build_spec(config), device="cpu", torch_threads=1).label_shard(Shard(url, "s-0"))
    rows = all_rows(config.output)
    assert [(row["width"], row["height"], row["status"]) for row in rows] == [(1600, 1200, "ok")] * 2
    for row in rows:
        check_labels(row)  # every mask decodes at the row's 1600x1200
        assert row["labels"]
    plain = load_config(None, {**base_config, "input": [url], "output": str(tmp_path / "out")})
    drafted, full = (ShardLabeler(build_spec(c), device="cpu", torch_threads=1)._decode(0, samples[0])
                     for c in (config, plain))
    assert (drafted.width, drafted.height) == (full.width, full.height) == (1600, 1200)
    assert drafted.tensor.shape == full.tensor.shape and not torch.equal(drafted.tensor, full.tensor)
    assert "jpeg_draft" not in build_spec(plain).source and build_spec(config).source["jpeg_draft"] is True
    assert build_spec(plain).fingerprint != build_spec(config).fingerprint


def test_each_phase_is_said_and_a_cache_hit_too(base_config, tmp_path, capsys):
    """Loading the model and encoding the prompts take minutes on a CPU: each says so as it
    happens, the encoding with its count of prompts; a second worker says it read the cache."""
    from tests.shards import write_shards
    url = str(write_shards(tmp_path / "in", shards=1, per_shard=2)[0])
    config = load_config(None, {**base_config, "input": [url], "templates": "imagenet80"})
    ShardLabeler(build_spec(config), device="cpu", torch_threads=1).label_shard(Shard(url, "s-0"))
    err = capsys.readouterr().err
    prompts = 4 * 80
    assert "gemlabel: loading model gemtest-micro (pretrained: " in err and "gemlabel: model gemtest-micro loaded in" in err
    assert f"gemlabel: encoding {prompts} prompts (4 names x 80 templates): 0/{prompts}" in err
    assert f"gemlabel: encoding {prompts} prompts (4 names x 80 templates): {prompts}/{prompts}" in err
    ShardLabeler(build_spec(config), device="cpu", torch_threads=1).shared_vocabulary()
    err = capsys.readouterr().err
    assert "gemlabel: text embeddings read from the cache " in err and "encoding" not in err


def test_images_done_mid_shard_are_published_for_the_driver(ray_session, base_config, tmp_path):
    """Workers publish each shard attempt's image count in Ray's key-value store; the driver
    counts those of shards it has no marker for yet, so one long shard shows images as it goes."""
    from pipeline.worker.progress import clear_progress, images_in_flight
    from tests.shards import write_shards
    urls = [str(u) for u in write_shards(tmp_path / "in", shards=2, per_shard=3)]
    config = load_config(None, {**base_config, "input": urls})
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1, run_id="run-x")
    assert images_in_flight("run-x", []) == 0
    for i, url in enumerate(urls):
        labeler.label_shard(Shard(url, f"s-{i}"))
    assert images_in_flight("run-x", []) == 6
    assert images_in_flight("run-x", ["s-0"]) == 3  # s-0's marker is counted instead
    clear_progress("run-x")
    assert images_in_flight("run-x", []) == 0
