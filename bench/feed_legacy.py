"""The stand-in model, and the worker as it was before issue 12, driven from ``bench_feed``.

The old worker runs in its own process from an export of its revision (its modules, not today's),
so that ``bench_feed`` can time it in the same run as today's worker, variant after variant on the
same shards. Commands arrive one JSON object a line on stdin, answers leave on stdout:

    {"seconds": 0.5, "urls": ["/tmp/x/hd-0.tar", ...]}  ->  {"img_s": 1.83}

    PYTHONPATH=<export of REV> python bench/feed_legacy.py OUT MODEL_CONFIG BATCH DECODE_THREADS
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

CLASSES = ["person", "dog", "cat", "sofa", "car", "bus", "bird", "chair", "table", "plant"]


class StandIn:
    """A model that takes ``seconds`` per batch with the GIL released (``time.sleep``, as a GPU
    kernel leaves the CPU free), returning (B, C, h, w) similarities with a few smooth regions per
    image, like a real segmenter's."""

    def __init__(self, classes: int, grid: tuple[int, int]):
        self.classes, self.grid, self.seconds = classes, grid, 0.0
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, images: torch.Tensor, vocabulary=None) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        coarse = torch.rand(images.shape[0], self.classes, 4, 4, generator=self.generator)
        return 0.15 + 0.2 * F.interpolate(coarse, size=self.grid, mode="bilinear", align_corners=False)


def main() -> None:
    out, model_config, batch, decode_threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from pipeline.config import load_config  # the old revision's modules (PYTHONPATH)
    from pipeline.runner import build_spec
    from pipeline.shards import Shard
    from pipeline.worker import ShardLabeler
    config = load_config(None, {
        "input": ["unused.tar"], "output": out, "vocab": CLASSES, "model": "gemtest-micro",
        "model_config": model_config, "pretrained": "none", "gem": {"depth": 3}, "input_size": [448, 448],
        "batch_size": batch, "decode_threads": decode_threads, "progress": False})
    labeler = ShardLabeler(build_spec(config), device="cpu", torch_threads=1)
    stand_in = StandIn(len(CLASSES), (448 // 16, 448 // 16))
    labeler.segmenter.patch_similarities = stand_in
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        stand_in.seconds = command["seconds"]
        start, images = time.perf_counter(), 0
        for index, url in enumerate(command["urls"]):
            images += labeler.label_shard(Shard(url, f"legacy-{index}"))["samples"]
        print(json.dumps({"img_s": images / (time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
