"""The shard worker outside Ray: one failing image never takes its batch or shard with it."""
from collections import Counter

import torch

from pipeline.config import load_config
from pipeline.reader import DecodedSample
from pipeline.runner import build_spec
from pipeline.shards import Shard
from pipeline.worker import ShardLabeler


def test_an_image_the_model_cannot_take_becomes_an_error_row(base_config, tmp_path):
    config = load_config(None, {**base_config, "input": ["unused.tar"]})
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
    good = [DecodedSample(i, f"k{i}", 80, 60, tensor=torch.randn(3, 128, 128)) for i in range(2)]
    bad = DecodedSample(2, "bad", 80, 60, tensor=torch.randn(2, 128, 128))  # two channels
    rows = labeler._rows_for_batch(Shard("s.tar", "s-1"), [good[0], bad, good[1]], timings=Counter())
    assert [(r["key"], r["status"]) for r in rows] == [("k0", "ok"), ("bad", "error"), ("k1", "ok")]
    assert rows[1]["error"].startswith("model: RuntimeError") and rows[1]["_kind"] == "model:RuntimeError"
    assert all(r["labels"] for r in rows if r["status"] == "ok")
