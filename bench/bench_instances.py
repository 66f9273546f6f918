"""What per-instance scores cost the worker's post-processing (issue 20).

    python -m bench.bench_instances --repeats 5

One image's (classes, 28, 28) similarities to its labels at the image's own size: the label map,
the regions and their RLE (``label_map``, ``class_regions``), with and without each region's components scored
(``pipeline.masks.components.instance_scores``), alternating round by round. Two kinds of
similarities: smooth (a few regions, as a segmenter gives) and noisy (each class scattered over
the whole image in many fragments, its box the whole image: the worst case). Prints JSON: best
seconds per variant and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from gem.postprocess import class_regions, label_map
from gem.settings import LabelingThresholds
from pipeline.masks.components import instance_scores

SIZES = {"voc_500x375": (375, 500), "hd_1920x1080": (1080, 1920), "photo_4000x3000": (3000, 4000)}


def similarities(kind: str, classes: int) -> torch.Tensor:
    torch.manual_seed(0)
    if kind == "smooth":
        coarse = torch.rand(1, classes, 4, 4)
        return (0.15 + 0.2 * F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False))[0]
    return 0.2 + 0.05 * torch.randn(classes, 28, 28)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = LabelingThresholds()
    report = {"torch": torch.__version__, "threads": args.threads, "loadavg_before": os.getloadavg(), "cases": {}}
    for kind in ("smooth", "noisy"):
        sims = similarities(kind, args.classes)
        for name, size in SIZES.items():
            def without():
                labels, stats = label_map(sims, size, thresholds)
                return labels, stats, list(class_regions(labels, stats, thresholds.min_area))

            def with_instances():
                labels, stats, regions = without()
                return [instance_scores(labels, stats.pixel_prob, r.class_id, r.bbox, r.score, thresholds.min_area)
                        for r in regions]
            instances = sum(len(i) for i in with_instances())
            best = {"without": float("inf"), "with_instances": float("inf")}
            for round_index in range(args.repeats):
                order = [without, with_instances] if round_index % 2 == 0 else [with_instances, without]
                for variant in order:
                    start = time.perf_counter()
                    variant()
                    best[variant.__name__] = min(best[variant.__name__], time.perf_counter() - start)
            report["cases"][f"{kind}/{name}"] = {
                "instances": instances, **{f"{k}_best_s": round(v, 4) for k, v in best.items()},
                "with_over_without": round(best["with_instances"] / best["without"], 3)}
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
