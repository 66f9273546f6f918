"""A moved input folder is recognised by its shards' content identity (issue 18.7): their labels
move with them instead of being labelled again (was: every row twice in the output)."""
import shutil

import pytest

from pipeline.config import load_config
from pipeline.driver.run import run_labeling
from pipeline.store.layout import OutputLayout, read_markers
from pipeline.io.storage import Location
from tests.outputs import all_rows, check_labels
from tests.shards import write_shards


def _labels(rows):
    return sorted((row["key"], [(l["name"], l["rle_counts"]) for l in row["labels"]]) for row in rows)


@pytest.mark.usefixtures("ray_session")
def test_a_moved_input_folder_keeps_its_labels_once(base_config, tmp_path, capsys):
    shards = write_shards(tmp_path / "a", shards=2, per_shard=3)
    config = {**base_config, "input": [str(tmp_path / "a" / "*.tar")]}
    assert run_labeling(load_config(None, config)).shards_done == 2
    before = all_rows(config["output"])
    shutil.move(tmp_path / "a", tmp_path / "b")  # mv keeps names, sizes and modification times
    capsys.readouterr()
    summary = run_labeling(load_config(None, {**config, "input": [str(tmp_path / "b" / "*.tar")]}))
    err = capsys.readouterr().err
    assert (summary.shards_done, summary.shards_skipped, summary.shards_moved) == (0, 2, 2)
    for shard in shards:
        assert f"{tmp_path / 'b' / shard.name} is {shard} moved (same name, size and mtime)" in err
    rows = all_rows(config["output"])
    assert len(rows) == 6 and _labels(rows) == _labels(before)  # once each, as labelled
    assert {row["shard"] for row in rows} == {str(tmp_path / "b" / s.name) for s in shards}
    markers = read_markers(OutputLayout(Location(config["output"])))
    assert {m["shard"] for m in markers.values()} == {row["shard"] for row in rows} and len(markers) == 2
    for row in rows:
        marker = markers[row["sample_id"].split("/", 1)[0]]
        assert row["shard"] == marker["shard"] and marker["moved_from"].startswith(str(tmp_path / "a"))
        check_labels(row)
    # the same name and size but not the same file (a copy without its times) is labelled as new
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "b" / shards[0].name, tmp_path / "c" / shards[0].name)
    summary = run_labeling(load_config(None, {**config, "input": [str(tmp_path / "c" / "*.tar")]}))
    assert (summary.shards_done, summary.shards_moved) == (1, 0)
