"""CPU decode + resize per image: what a CPU worker does (normalised float input) against what a
GPU worker does (uint8 pixels, normalised on the GPU).

    python -m bench.bench_decode --repeats 5

Real VOC photos and generated 1920x1080 JPEGs (as in bench_feed), 448x448 model input, one thread;
the two variants alternate image by image; best of ``--repeats`` passes, ms per image.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.bench_feed import hd_image, jpeg, photos
from gem.preprocess import OPENAI_MEAN, OPENAI_STD
from pipeline.reader import decode_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pictures = photos()
    sets = {"voc": [jpeg(p) for p in pictures], "hd_1920x1080": [jpeg(hd_image(p, i)) for i, p in enumerate(pictures[:6])]}
    size = (args.size, args.size)
    report = {"loadavg_before": os.getloadavg(), "sets": {}}
    for name, images in sets.items():
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):
            spent = {True: 0.0, False: 0.0}
            for index, data in enumerate(images):
                for normalized in (True, False) if index % 2 == 0 else (False, True):
                    start = time.perf_counter()
                    decode_sample(index, {"__key__": str(index), "jpg": data}, size, OPENAI_MEAN, OPENAI_STD,
                                  normalized=normalized)
                    spent[normalized] += time.perf_counter() - start
            best = {k: min(best[k], spent[k]) for k in best}
        report["sets"][name] = {"images": len(images),
                                "cpu_worker_ms": round(1000 * best[True] / len(images), 2),
                                "gpu_worker_ms": round(1000 * best[False] / len(images), 2),
                                "saved": round(1 - best[False] / best[True], 3)}
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
