"""Labels are never lost, mixed or silently dropped (issue 7), and bad bookkeeping files never
crash a run or a report (issue 8): real local Ray, real shards, Parquet read back."""
import json
import logging
import threading

import pytest

from jobs.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.driver.run import run_labeling
from pipeline.io.shards import shard_id_for
from tests.models import save_micro_checkpoint
from tests.outputs import all_rows, read_tables
from tests.shards import encode, photo, varied_samples, write_shard, write_shards
from tests.test_tar_members import awkward_members, member_ends, write_members

pytestmark = pytest.mark.usefixtures("ray_session")


def test_done_means_readable_and_changed_shards_are_relabelled(base_config, tmp_path, capsys):
    shards = write_shards(tmp_path / "in", shards=3, per_shard=4)
    config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")]})
    assert run_labeling(config).shards_done == 3
    layout = OutputLayout(config.location(config.output))
    ids = [shard_id_for(str(s)) for s in shards]
    marker = read_markers(layout)[ids[0]]
    assert marker["parquet_bytes"] > 0 and marker["input"]["size"] == shards[0].stat().st_size

    (tmp_path / "out" / "labels" / f"{ids[0]}.parquet").unlink()                    # deleted
    (tmp_path / "out" / "labels" / f"{ids[1]}.parquet").write_bytes(b"PAR1 garbage")  # corrupt
    write_shard(shards[2], varied_samples(5, prefix="s2-"))                        # replaced input

    assert main(["report", config.output]) == 1
    report = capsys.readouterr().out
    assert "1 done, 0 failed, 2 missing" in report
    assert report.count("MISSING") == 2 and "Parquet file missing" in report

    again = run_labeling(config)
    assert (again.shards_done, again.shards_skipped) == (3, 0)
    tables = read_tables(config.output)
    assert tables[f"{ids[2]}.parquet"].num_rows == 5
    assert sorted(t.num_rows for t in tables.values()) == [4, 4, 5]
    assert run_labeling(config).shards_skipped == 3


def test_every_tar_member_becomes_one_row_and_a_cut_tar_fails(base_config, tmp_path):
    awkward = write_members(tmp_path / "in" / "awkward.tar", awkward_members())
    cut = write_shard(tmp_path / "in" / "cut.tar", varied_samples(4))
    cut.write_bytes(cut.read_bytes()[:member_ends(cut)[3]])  # two whole samples, no end blocks
    config = load_config(None, {**base_config, "input": [str(awkward), str(cut)], "max_shard_retries": 1})
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_failed, summary.shard_retries) == (1, 1, 1)
    assert "truncated" in summary.failed[str(cut)]
    rows = all_rows(config.output)
    prefix = shard_id_for(str(awkward)) + "/"
    assert sorted(r["sample_id"].removeprefix(prefix) for r in rows) == sorted(
        ["a", "b", "a#2", "x", "x#2", "img", "img#2", "dup", "dup#2", "sub/c", "cap"])
    assert [r["status"] for r in rows].count("ok") == 10


def test_two_drivers_racing_on_a_fresh_output_one_wins(base_config, tmp_path):
    write_shards(tmp_path / "in", shards=2, per_shard=2)
    start = threading.Barrier(2)
    outcomes = {}

    def drive(name, vocab):
        config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "vocab": vocab})
        start.wait()
        try:
            outcomes[name] = run_labeling(config).shards_done
        except ConfigError as err:
            outcomes[name] = str(err)

    threads = [threading.Thread(target=drive, args=("A", ["cat", "dog"])),
               threading.Thread(target=drive, args=("B", ["car", "bus"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    done = [name for name, outcome in outcomes.items() if outcome == 2]
    refused = [outcome for outcome in outcomes.values() if isinstance(outcome, str)]
    assert len(done) == 1 and len(refused) == 1 and "changed: vocab" in refused[0], outcomes
    winner_vocab = {"A": {"cat", "dog"}, "B": {"car", "bus"}}[done[0]]
    names = {label["name"] for row in all_rows(base_config["output"]) for label in row["labels"]}
    assert names and names <= winner_vocab
    settings = json.loads((tmp_path / "out" / "_config.json").read_text())["settings"]
    assert set(settings["vocab"]) == winner_vocab


def test_fingerprint_covers_precision_and_file_contents(base_config, tmp_path):
    write_shards(tmp_path / "in", shards=1, per_shard=2)
    checkpoint = save_micro_checkpoint(tmp_path / "model.pt", seed=0)
    model_config = tmp_path / "configs" / "gemtest-micro.json"  # open_clip names a model by the file's stem
    model_config.parent.mkdir()
    model_config.write_text(open(base_config["model_config"]).read())
    settings = {**base_config, "input": [str(tmp_path / "in" / "*.tar")], "pretrained": str(checkpoint),
                "model_config": str(model_config), "precision": "fp32"}
    assert run_labeling(load_config(None, settings)).shards_done == 1
    with pytest.raises(ConfigError, match="changed: precision"):
        run_labeling(load_config(None, {**settings, "precision": "bf16"}))
    with pytest.raises(ConfigError, match="changed: jpeg_draft"):  # other input pixels
        run_labeling(load_config(None, {**settings, "jpeg_draft": True}))
    save_micro_checkpoint(checkpoint, seed=1)  # same path, other weights
    with pytest.raises(ConfigError, match="changed: pretrained_content.sha256"):
        run_labeling(load_config(None, settings))
    save_micro_checkpoint(checkpoint, seed=0)
    assert run_labeling(load_config(None, settings)).shards_skipped == 1  # the same bytes again
    model_config.write_text(model_config.read_text().replace("{", "{\n", 1))  # same config, other bytes
    with pytest.raises(ConfigError, match="changed: model_config_content"):
        run_labeling(load_config(None, settings))


def test_bad_markers_and_config_are_named_and_the_run_carries_on(base_config, tmp_path, caplog, capsys):
    shards = write_shards(tmp_path / "in", shards=3, per_shard=2)
    config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")]})
    run_labeling(config)
    markers = tmp_path / "out" / "_markers"
    ids = [shard_id_for(str(s)) for s in shards]
    (markers / f"{ids[0]}.json").write_text('{"shard": "trunc')
    (markers / f"{ids[1]}.json").write_text("")
    (markers / "notes.json").write_text("[1, 2, 3]")
    (tmp_path / "out" / "_config.json").write_text("not json")
    caplog.set_level(logging.WARNING)

    assert main(["report", config.output]) == 0
    assert "1 done" in capsys.readouterr().out
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in (f"{ids[0]}.json", f"{ids[1]}.json", "notes.json", "_config.json"):
        assert name in warned
    caplog.clear()
    summary = run_labeling(config)
    assert (summary.shards_done, summary.shards_skipped) == (2, 1)
    assert "_config.json" in " ".join(r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "_config.json").read_text())["fingerprint"]
    assert len(all_rows(config.output)) == 6


def test_identical_runs_write_equal_tables(base_config, tmp_path):
    jpeg = encode(photo(1, (50, 40)), "JPEG")
    shard = write_shard(tmp_path / "in" / "mixed.tar", [
        {"__key__": "ok", "jpg": jpeg}, {"__key__": "garbage", "jpg": b"\xff\xd8 not a jpeg"},
        {"__key__": "cut", "jpg": jpeg[: len(jpeg) // 3]}])
    tables = []
    for name in ("one", "two"):
        config = load_config(None, {**base_config, "input": [str(shard)], "output": str(tmp_path / name)})
        run_labeling(config)
        (table,) = read_tables(config.output).values()
        tables.append(table)
    errors = [e for e in tables[0].column("error").to_pylist() if e]
    assert len(errors) == 2 and not any("0x" in e for e in errors), errors
    assert tables[0].equals(tables[1]) and tables[0].schema.metadata == tables[1].schema.metadata


def test_a_run_removes_temp_files_that_writers_killed_long_ago_left(base_config, tmp_path):
    """Writers killed mid-write (a node lost, the driver killed) leave hidden temp files in any
    folder of the output; the next run removes those untouched for over an hour, and leaves
    younger ones (another run on the same output may be writing them) and other files."""
    import os
    import time
    from pathlib import Path

    from tests.outputs import leftover_temp

    write_shards(tmp_path / "in", shards=1, per_shard=2)
    config = load_config(None, {**base_config, "input": [str(tmp_path / "in" / "*.tar")]})
    layout = OutputLayout(config.location(config.output))
    files = [layout.config_file, layout.labels_file("x-1"), layout.marker_file("x-1"), layout.run_file("r"),
             layout.cache_dir.child("text-k.pt")]
    kept = {}
    for file in files:
        for age in (2 * 3600, 60):
            kept[leftover_temp(file.path, time.time() - age)] = age == 60
    other = Path(layout.labels_dir.path) / ".notes.tmp-mine"  # not a name temp_path gives
    other.write_text("mine")
    os.utime(other, (time.time() - 2 * 3600,) * 2)
    kept[other] = True
    assert run_labeling(config).shards_done == 1
    assert {temp: temp.exists() for temp in kept} == kept
