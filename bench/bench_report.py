"""Cost of ``gemlabel report``'s per-class table on an output of many small shards.

    python -m bench.bench_report --shards 10000 --images 20 --classes 20

Writes an output of --shards Parquet files (each --images images with 4 labels of 96x128 masks,
real RLE) with their markers, then times the markers-only report (``--no-classes``) and the
per-class report (which also reads each file's class, score and area columns), each twice (the
second run's files are in the page cache, as on a machine that just wrote them).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.io.storage import Location
from pipeline.store.layout import OutputLayout, write_json
from pipeline.store.marker import shard_marker
from pipeline.store.report import summarize_output
from pipeline.store.rle import encode_mask
from pipeline.store.schema import table_from_rows


def write_output(root: Path, shards: int, images: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    vocab = [f"class{k}" for k in range(classes)]
    layout = OutputLayout(Location(str(root)))
    write_json(layout.config_file, {"fingerprint": "bench", "settings": {"vocab": vocab}})
    masks = []
    for _ in range(16):
        mask = np.zeros((96, 128), dtype=bool)
        y, x = rng.integers(0, 60), rng.integers(0, 90)
        mask[y:y + rng.integers(10, 36), x:x + rng.integers(10, 38)] = True
        masks.append((mask, encode_mask(mask)))
    started = datetime.now(timezone.utc)
    for s in range(shards):
        shard_id = f"s{s:06d}"
        rows = []
        for i in range(images):
            labels = []
            for class_id in rng.choice(classes, 4, replace=False):
                mask, rle = masks[rng.integers(16)]
                labels.append({"class_id": int(class_id), "name": vocab[class_id], "score": float(rng.random()),
                               "peak_score": 0.9, "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "point_x": 0,
                               "point_y": 0, "rle_size": rle["size"], "rle_counts": rle["counts"]})
            rows.append({"sample_id": f"{shard_id}/k{i}", "key": f"k{i}", "shard": f"/in/{shard_id}.tar",
                         "width": 128, "height": 96, "status": "ok", "error": None, "labels": labels})
        buffer = io.BytesIO()
        pq.write_table(table_from_rows(rows, {"vocab": vocab}), buffer)
        layout.labels_file(shard_id).write_bytes_atomic(buffer.getvalue())
        write_json(layout.marker_file(shard_id), shard_marker(f"/in/{shard_id}.tar", shard_id, "bench", rows,
                                                              len(buffer.getvalue()), {}, started=started,
                                                              total_s=1.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=10000)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-report-")) / "out"
    try:
        start = time.perf_counter()
        write_output(root, args.shards, args.images, args.classes)
        result = {"shards": args.shards, "images": args.shards * args.images,
                  "write_s": round(time.perf_counter() - start, 1)}
        for run in (1, 2):
            for per_class in (False, True):
                start = time.perf_counter()
                report = summarize_output(Location(str(root)), per_class=per_class)
                result[f"{'per_class' if per_class else 'markers_only'}_s_run{run}"] = round(
                    time.perf_counter() - start, 2)
        assert sum(r["labels"] for r in report["per_class"]) == report["labels"]
        print(json.dumps(result))
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
