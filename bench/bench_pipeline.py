"""Pipeline overhead: end-to-end images/s of `gemlabel label` against the model alone.

    python -m bench.bench_pipeline --model ViT-B-16 --input-size 224 --shards 4 --per-shard 24 --threads 2

Same machine, same random-weight model, same batch size and torch threads. Inputs are the VOC
photos in tests/data/voc, JPEG-encoded into webdataset shards. Rates reported:
  model_only          patch similarities on pre-decoded, pre-resized batches
  model_and_labels    + label maps at original resolution, points, RLE encoding
  pipeline_steady     gemlabel's workers: images / time spent inside shards (markers' total_s)
  pipeline_wall       the whole run: Ray start, model load, all shards
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gem import GEMSegmenter, GEMSettings, LabelingThresholds, label_image, load_clip  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.store.rle import label_record  # noqa: E402
from pipeline.store.layout import OutputLayout, read_markers  # noqa: E402
from pipeline.driver.run import run_labeling  # noqa: E402
from pipeline.io.storage import Location  # noqa: E402
from tests.shards import encode, photo, write_shard, PHOTOS  # noqa: E402

CLASSES = ["person", "dog", "cat", "sofa", "car", "bus", "bird", "chair", "table", "plant"]


def make_shards(folder: Path, shards: int, per_shard: int) -> list[Path]:
    paths = []
    for s in range(shards):
        samples = [{"__key__": f"s{s}-{i:04d}", "jpg": encode(photo(s * per_shard + i), "JPEG", quality=90)}
                   for i in range(per_shard)]
        paths.append(write_shard(folder / f"bench-{s:03d}.tar", samples))
    return paths


def bench_model(model: str, size: int, batch: int, images: int) -> dict:
    torch.manual_seed(0)
    segmenter = GEMSegmenter(load_clip(model, None, "cpu"), GEMSettings(), device="cpu")
    vocab = segmenter.vocabulary(CLASSES)
    pictures = [photo(i) for i in range(images)]
    batches = [segmenter.preprocess(pictures[i:i + batch], (size, size)) for i in range(0, images, batch)]
    segmenter.patch_similarities(batches[0], vocab)  # warm-up
    start = time.perf_counter()
    sims = [segmenter.patch_similarities(b, vocab) for b in batches]
    model_s = time.perf_counter() - start
    start = time.perf_counter()
    for s, picture in zip(torch.cat(sims), pictures):
        _, regions = label_image(s, (picture.height, picture.width), LabelingThresholds())
        [label_record(r, CLASSES) for r in regions]
    labels_s = time.perf_counter() - start
    return {"model_only": images / model_s, "model_and_labels": images / (model_s + labels_s)}


def bench_pipeline(model: str, size: int, batch: int, threads: int, shards: list[Path], out: Path) -> dict:
    config = load_config(None, {"input": [str(p) for p in shards], "output": str(out), "vocab": CLASSES,
                                "model": model, "pretrained": "none", "input_size": [size], "batch_size": batch,
                                "cpus_per_worker": float(threads), "num_workers": 1, "decode_threads": 2,
                                "progress": False})
    summary = run_labeling(config)
    markers = read_markers(OutputLayout(Location(str(out)))).values()
    busy = sum(m["timings"]["total_s"] for m in markers)
    return {"pipeline_steady": summary.images / busy, "pipeline_wall": summary.images_per_s,
            "images": summary.images, "wall_s": summary.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "in", args.shards, args.per_shard)
        model = bench_model(args.model, args.input_size, args.batch, args.batch * 4)
        pipeline = bench_pipeline(args.model, args.input_size, args.batch, args.threads, shards, Path(tmp) / "out")
    rates = {**model, **pipeline}
    rates["overhead_vs_model_only"] = 1 - rates["pipeline_steady"] / rates["model_only"]
    print(json.dumps({"args": vars(args), "photos": len(PHOTOS), "torch": torch.__version__, **rates}, indent=2))


if __name__ == "__main__":
    main()
