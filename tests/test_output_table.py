"""An output root reads as one table (one row per image) with pandas, pyarrow, duckdb and Hugging
Face datasets, with exports in their default folders and a killed writer's temp file beside it."""
from __future__ import annotations

import time

import pytest

from pipeline.export import coco, semantic
from pipeline.export.common import ExportOptions
from pipeline.export.runner import default_dest, export_shard
from pipeline.io.storage import Location
from pipeline.store.labelset import open_labelset
from tests.known_output import write_known_output
from tests.outputs import leftover_temp

pd = pytest.importorskip("pandas")
ds = pytest.importorskip("pyarrow.dataset")
duckdb = pytest.importorskip("duckdb")
datasets = pytest.importorskip("datasets")


def read_everywhere(output: str, cache: str) -> dict[str, list[str]]:
    """sample_ids as each reader sees the output root (the calls the docs give)."""
    hf = datasets.load_dataset(output, data_dir="labels", split="train", cache_dir=cache)
    return {
        "pandas": list(pd.read_parquet(output)["sample_id"]),
        "pyarrow": ds.dataset(output).to_table(columns=["sample_id"]).column("sample_id").to_pylist(),
        "duckdb": [r[0] for r in duckdb.sql(f"SELECT sample_id FROM read_parquet('{output}/**/*.parquet')").fetchall()],
        "datasets": list(hf["sample_id"]),
    }


def test_the_output_root_is_one_table_with_and_without_exports(tmp_path):
    (tmp_path / "shards").mkdir()
    output = str(tmp_path / "out")
    known = write_known_output(str(tmp_path / "shards"), output)
    expected = sorted([*known, next(iter(known)).split("/")[0] + "/broken"])
    for reader, ids in read_everywhere(output, str(tmp_path / "hf0")).items():
        assert sorted(ids) == expected, reader
    labels = open_labelset(Location(output))
    for fmt, writer in (("coco", coco), ("semantic", semantic)):  # the exporter's own steps, default folders
        options = ExportOptions(fmt, default_dest(Location(output), fmt), images=True)
        for shard_id in labels.shard_ids():
            export_shard(labels, shard_id, options)
        writer.finish(labels, labels.shard_ids(), options)
    assert default_dest(Location(output), "coco").child("annotations", "train.json").exists()
    leftover_temp(str(tmp_path / "out" / "labels" / f"{labels.shard_ids()[0]}.parquet"), time.time())
    for reader, ids in read_everywhere(output, str(tmp_path / "hf1")).items():
        assert sorted(ids) == expected, reader
    table = pd.read_parquet(output)
    assert table.loc[table["status"] == "ok", "labels"].map(len).tolist() == [3, 3, 3]

