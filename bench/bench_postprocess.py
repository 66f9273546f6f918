"""Post-processing on the CPU: today's label maps and class statistics against an earlier revision's.

    python -m bench.bench_postprocess --baseline-rev 5d94eed --repeats 5

One image's (classes, 28, 28) similarities (448 px input, smooth regions as a segmenter gives) to
its label map and regions at the image's own size: ``gem.postprocess.label_image`` of this tree
(statistics accumulated per band with torch ops that run on the similarities' device,
``RegionStats``) against the same function of ``--baseline-rev`` (numpy statistics on the CPU),
loaded from git into this process. Variants alternate round by round; best and median seconds,
and a check that both give the same regions (class, area, box, point, RLE) and scores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gem import postprocess
from gem.settings import LabelingThresholds

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"voc_500x375": (375, 500), "hd_1920x1080": (1080, 1920)}


def module_at(rev: str, path: str, name: str):
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def regions_key(regions) -> list:
    return [(r.class_id, r.area, tuple(r.bbox), tuple(r.point), r.rle["counts"]) for r in regions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", default="5d94eed", help="revision whose gem/postprocess.py to compare")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = module_at(args.baseline_rev, "gem/postprocess.py", "baseline_postprocess")
    torch.manual_seed(0)
    coarse = torch.rand(1, args.classes, 4, 4)
    sims = (0.15 + 0.2 * F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False))[0]
    thresholds = LabelingThresholds()
    report = {"torch": torch.__version__, "threads": args.threads, "baseline_rev": args.baseline_rev,
              "loadavg_before": os.getloadavg(), "sizes": {}}
    for name, size in SIZES.items():
        variants = {"today": lambda: postprocess.label_image(sims, size, thresholds),
                    "baseline": lambda: baseline.label_image(sims, size, thresholds)}
        today, before = variants["today"]()[1], variants["baseline"]()[1]  # warm-up and equality
        same = regions_key(today) == regions_key(before)
        score_diff = max(abs(a.score - b.score) for a, b in zip(today, before))
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for round_index in range(args.repeats):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for variant in order:
                start = time.perf_counter()
                variants[variant]()
                seconds[variant].append(time.perf_counter() - start)
        best = {v: min(s) for v, s in seconds.items()}
        report["sizes"][name] = {
            "regions": len(today), "same_regions": same, "max_score_difference": score_diff,
            **{f"{v}_best_s": round(best[v], 4) for v in variants},
            **{f"{v}_median_s": round(statistics.median(seconds[v]), 4) for v in variants},
            "baseline_over_today": round(best["baseline"] / best["today"], 2)}
        print(name, json.dumps(report["sizes"][name]), file=sys.stderr, flush=True)
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
