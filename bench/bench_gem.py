"""GEM model benchmark: images/s of the fast path against the naive path, and the text-cache gain.

    python -m bench.bench_gem --threads 2 --size 448 --batch 2 --repeats 3

Random-weight ViT-B-16 (weights do not change the arithmetic). Three vision variants:
  naive     explicit N x N attention matrices, original path run to the end (as the reference)
  sdpa-all  scaled_dot_product_attention kernels, original path run to the end
  fast      SDPA kernels and no original-path work after the last block the output does not use
Text cache: time to encode classes x templates prompts once, against the per-image vision time;
without a cache every image would pay both. Encoding is timed on a sample of prompts and scaled
to the full vocabulary (the text tower's cost is linear in the prompt count).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gem import GEMSegmenter, GEMSettings, load_clip


def bench_vision(model: str, size: int, batch: int, repeats: int, device: str, precision: str) -> dict:
    """Variants run round-robin (the order rotating each round) so that machine noise and
    allocator warm-up fall on all of them alike; best and median seconds per batch."""
    torch.manual_seed(0)
    clip = load_clip(model, None, device)
    images = torch.randn(batch, 3, size, size, device=device)
    variants = {"naive": (False, True), "sdpa-all": (True, True), "fast": (True, False)}
    runners = {}
    for name, (fast, keep_original) in variants.items():
        segmenter = GEMSegmenter(clip, GEMSettings(), device=device, precision=precision, fast=fast)

        def run(segmenter=segmenter, keep_original=keep_original):
            segmenter.tokens(images, keep_original=keep_original)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        run()  # warm-up
        runners[name] = run
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            start = time.perf_counter()
            runners[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"best_s": min(v), "median_s": statistics.median(v), "images_per_s": batch / min(v)}
            for name, v in seconds.items()}


def bench_text_cache(model: str, classes: int, templates: int, sample: int, device: str, precision: str) -> dict:
    clip = load_clip(model, None, device)
    segmenter = GEMSegmenter(clip, GEMSettings(), device=device, precision=precision)
    names = [f"class {i}" for i in range(classes)]
    template_list = [f"photo {j} of a {{}}." for j in range(templates)]
    sample_classes = max(1, sample // templates)
    start = time.perf_counter()
    segmenter.vocabulary(names[:sample_classes], template_list)
    sampled = time.perf_counter() - start
    encoded = segmenter.text.encoded_prompts
    full_encode = sampled * classes * templates / encoded
    start = time.perf_counter()
    for _ in range(1000):
        segmenter.vocabulary(names[:sample_classes], template_list)
    cached_lookup = (time.perf_counter() - start) / 1000
    return {"prompts": classes * templates, "sampled_prompts": encoded, "sampled_seconds": sampled,
            "full_encode_seconds_est": full_encode, "cached_lookup_seconds": cached_lookup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--templates", type=int, default=80)
    parser.add_argument("--text-sample", type=int, default=480, help="prompts actually encoded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip-text", action="store_true", help="vision only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vision = bench_vision(args.model, args.size, args.batch, args.repeats, args.device, args.precision)
    report = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "model": args.model,
              "size": args.size, "batch": args.batch, "vision": vision}
    if args.skip_text:
        print(json.dumps(report, indent=2))
        return
    text = bench_text_cache(args.model, args.classes, args.templates, args.text_sample, args.device, args.precision)
    per_image = 1.0 / vision["fast"]["images_per_s"]
    text["per_image_without_cache_s"] = per_image + text["full_encode_seconds_est"]
    text["per_image_with_cache_s"] = per_image + text["cached_lookup_seconds"]
    text["gain"] = text["per_image_without_cache_s"] / text["per_image_with_cache_s"]
    print(json.dumps({**report, "text_cache": text}, indent=2))


if __name__ == "__main__":
    main()
