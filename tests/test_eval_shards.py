"""eval with ground truth in shards whose keys repeat across shards (issue 18.6): rows are matched
by shard and name in the shard, not by key alone (which scored the first shard's labels against
every shard's masks). Real tar shards with seg.png masks, a real Parquet output."""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from jobs.cli import main
from pipeline.io.shards import shard_id_for
from pipeline.io.storage import Location
from pipeline.store.layout import OutputLayout, write_json
from pipeline.store.marker import shard_marker
from pipeline.store.rle import encode_mask
from pipeline.store.schema import table_from_rows
from tests.shards import encode, photo, write_shard

VOCAB = ["cat", "dog"]


def mask_for(shard: int, index: int) -> np.ndarray:
    """(48, 64) class indices: a cat box in shard 0, a dog box elsewhere in shard 1."""
    target = np.zeros((48, 64), np.uint8)
    if shard == 0:
        target[4:20, 4 + index * 8:30 + index * 8] = 1
    else:
        target[26:44, 30 - index * 8:60 - index * 8] = 2
    return target


def test_eval_matches_rows_by_shard_and_key_when_keys_repeat(tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    shards, rows_by_shard = [], {}
    for s in range(2):
        samples = [{"__key__": f"k{i}", "jpg": encode(photo(i, (64, 48)), "JPEG"),
                    "seg.png": encode(Image.fromarray(mask_for(s, i)), "PNG")} for i in range(2)]
        shards.append(str(write_shard(tmp_path / "gt" / f"gt-{s}.tar", samples)))
    layout = OutputLayout(Location(str(tmp_path / "labels")))
    write_json(layout.config_file, {"fingerprint": "gt", "settings": {"vocab": VOCAB}})
    for s, url in enumerate(shards):
        shard_id, rows = shard_id_for(url), []
        for i in range(2):
            target = mask_for(s, i)
            labels = []
            for value in (1, 2):
                mask = target == value
                if mask.any():
                    ys, xs = np.nonzero(mask)
                    rle = encode_mask(mask)
                    labels.append({"class_id": value - 1, "name": VOCAB[value - 1], "score": 1.0, "peak_score": 1.0,
                                   "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "point_x": int(xs[0]),
                                   "point_y": int(ys[0]), "rle_size": rle["size"], "rle_counts": rle["counts"]})
            rows.append({"sample_id": f"{shard_id}/k{i}", "key": f"k{i}", "shard": url, "width": 64, "height": 48,
                         "status": "ok", "error": None, "labels": labels})
        rows_by_shard[shard_id] = rows
        buffer = io.BytesIO()
        pq.write_table(table_from_rows(rows, {"vocab": VOCAB}), buffer)
        layout.labels_file(shard_id).write_bytes_atomic(buffer.getvalue())
        write_json(layout.marker_file(shard_id), shard_marker(url, shard_id, "gt", rows, buffer.getbuffer().nbytes,
                                                              {}, started=datetime.now(timezone.utc), total_s=0.0))
    report = tmp_path / "report"
    assert main(["eval", "--gt-shards", *shards, "--classes", str(tmp_path / "classes.txt"),
                 "--labels", str(tmp_path / "labels"), "--report", str(report), "--no-progress"]) == 0
    result = json.loads((report / "report.json").read_text())
    assert result["images"]["scored"] == 4
    assert result["summary"]["mIoU"] == 100.0 and result["summary"]["aAcc"] == 100.0
    assert "more than one labelled shard" not in capsys.readouterr().err
