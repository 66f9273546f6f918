"""CPU decode + resize per image: what a CPU worker does (normalised float input) against what a
GPU worker does (uint8 pixels, normalised on the GPU), each with and without ``jpeg_draft``
(Pillow's draft mode: JPEGs decoded at 1/2, 1/4 or 1/8 scale where that still covers the input).

    python -m bench.bench_decode --repeats 5

Real VOC photos and generated 1920x1080 JPEGs (as in bench_feed), the model input of ``--resize``
(square 448x448, or short side 448), one thread; the variants take turns image by image, in a
rotating order; best of ``--repeats`` passes, ms per image. ``draft_input_diff``: the mean absolute
difference of the draft input's uint8 pixels from the full decode's (of 255).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.bench_feed import hd_image, jpeg, photos
from gem.preprocess import OPENAI_MEAN, OPENAI_STD
from gem.windows import ResizeSettings
from pipeline.worker.decode import decode_sample

VARIANTS = {"cpu_worker": (True, False), "gpu_worker": (False, False),
            "cpu_worker_draft": (True, True), "gpu_worker_draft": (False, True)}  # (normalized, jpeg_draft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resize", choices=("square", "short_side"), default="square")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pictures = photos()
    sets = {"voc": [jpeg(p) for p in pictures], "hd_1920x1080": [jpeg(hd_image(p, i)) for i, p in enumerate(pictures[:6])]}
    input_size = ResizeSettings(mode=args.resize).model_size
    names = list(VARIANTS)
    report = {"resize": args.resize, "loadavg_before": os.getloadavg(), "sets": {}}
    for set_name, images in sets.items():
        best = dict.fromkeys(names, float("inf"))
        for _ in range(args.repeats):
            spent = dict.fromkeys(names, 0.0)
            for index, data in enumerate(images):
                for turn in range(len(names)):
                    name = names[(index + turn) % len(names)]
                    normalized, draft = VARIANTS[name]
                    start = time.perf_counter()
                    decode_sample(index, {"__key__": str(index), "jpg": data}, input_size, OPENAI_MEAN, OPENAI_STD,
                                  normalized=normalized, jpeg_draft=draft)
                    spent[name] += time.perf_counter() - start
            best = {name: min(best[name], spent[name]) for name in names}
        diffs = []
        for index, data in enumerate(images):
            full, drafted = (decode_sample(index, {"jpg": data}, input_size, OPENAI_MEAN, OPENAI_STD,
                                           normalized=False, jpeg_draft=draft).tensor.float() for draft in (False, True))
            diffs.append(float((full - drafted).abs().mean()))
        ms = {f"{name}_ms": round(1000 * best[name] / len(images), 2) for name in names}
        report["sets"][set_name] = {
            "images": len(images), **ms,
            "uint8_saved": round(1 - best["gpu_worker"] / best["cpu_worker"], 3),
            "draft_speedup_cpu_worker": round(best["cpu_worker"] / best["cpu_worker_draft"], 2),
            "draft_speedup_gpu_worker": round(best["gpu_worker"] / best["gpu_worker_draft"], 2),
            "draft_input_diff": round(sum(diffs) / len(diffs), 2)}
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
