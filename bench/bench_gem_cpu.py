"""What is left on the CPU path: GEM fast path variants against the published reference, round-robin.

    python -m bench.bench_gem_cpu --threads 2 --repeats 4 --reference-path /tmp/gemref

Random ViT-B-16 (the same weights for every variant), 448x448, batch 1, 3 classes, CPU. Variants:
  reference      gem_torch 1.0.1's GEMWrapper (the published implementation), vision tower forward;
                 needs --reference-path: a folder holding its gem_wrapper.py and gem_utils.py as
                 package ``gemref`` (its own package name, ``gem``, is this project's) and einops
  fast           this project's fast path, fp32 (what gemlabel runs on a CPU)
  fast-bf16      the same under bf16 autocast
  fast-cl        channels-last input and patch convolution
  fast-compiled  torch.compile of the vision tower (compile time reported apart)
  naive          explicit N x N attention matrices (this project's reference path)
The variants run in a rotating order each round so machine noise falls on all alike; best and
median seconds per image.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from gem import GEMSegmenter, GEMSettings, load_clip

CLASSES = ["person", "dog", "car"]


def build(args) -> tuple[dict, dict]:
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", None, "cpu")
    image = torch.randn(1, 3, args.size, args.size)
    runners, notes = {}, {}
    if args.reference_path:
        sys.path.insert(0, args.reference_path)
        from gem.torchvision_shim import import_torchvision
        import_torchvision()
        import open_clip
        from gemref.gem_wrapper import GEMWrapper
        wrapper = GEMWrapper(copy.deepcopy(clip.model), open_clip.get_tokenizer("ViT-B-16"), depth=7).eval()
        text = wrapper.encode_text(CLASSES).detach()

        def reference():
            feats = wrapper.model.visual(image)[0]
            return torch.nn.functional.normalize(feats, dim=-1)[:, 1:] @ text.transpose(-1, -2)
        runners["reference"] = reference
    variants = {"fast": dict(fast=True, precision="fp32"), "fast-bf16": dict(fast=True, precision="bf16"),
                "naive": dict(fast=False, precision="fp32")}
    for name, options in variants.items():
        if name in args.skip:
            continue
        segmenter = GEMSegmenter(clip, GEMSettings(), device="cpu", **options)
        vocab = segmenter.vocabulary(CLASSES)
        runners[name] = (lambda s=segmenter, v=vocab: s.patch_similarities(image, v))
    if "fast-cl" not in args.skip:
        segmenter = GEMSegmenter(copy.deepcopy(clip), GEMSettings(), device="cpu", precision="fp32")
        segmenter.model.visual.conv1.to(memory_format=torch.channels_last)
        vocab = segmenter.vocabulary(CLASSES)
        image_cl = image.contiguous(memory_format=torch.channels_last)
        runners["fast-cl"] = lambda s=segmenter, v=vocab: s.patch_similarities(image_cl, v)
    if "fast-compiled" not in args.skip:
        segmenter = GEMSegmenter(clip, GEMSettings(), device="cpu", precision="fp32")
        vocab = segmenter.vocabulary(CLASSES)
        segmenter.tower = torch.compile(segmenter.tower)
        start = time.perf_counter()
        with torch.no_grad():
            segmenter.patch_similarities(image, vocab)
        notes["compile_s"] = round(time.perf_counter() - start, 1)
        runners["fast-compiled"] = lambda s=segmenter, v=vocab: s.patch_similarities(image, v)
    return runners, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-path", default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runners, notes = build(args)
    with torch.no_grad():
        for run in runners.values():
            run()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for round_index in range(args.repeats):
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                start = time.perf_counter()
                runners[name]()
                seconds[name].append(time.perf_counter() - start)
            print(json.dumps({n: round(v[-1], 3) for n, v in seconds.items()}), file=sys.stderr, flush=True)
    result = {name: {"best_s": round(min(v), 3), "median_s": round(statistics.median(v), 3)}
              for name, v in seconds.items()}
    base = result.get("reference", result["fast"])["best_s"]
    for value in result.values():
        value["speedup_vs_reference"] = round(base / value["best_s"], 2)
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "loadavg": os.getloadavg(),
                      **notes, "variants": result}, indent=1))


if __name__ == "__main__":
    main()
