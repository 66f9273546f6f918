"""Does the worker keep an accelerator fed? A stand-in model on this machine, or the real one on a GPU.

    python -m bench.bench_feed --images 160 --hd-images 40 --batch 8 --threads 2

Stand-in mode (default; no GPU needed): the model is replaced by a stand-in that takes a fixed
time per batch while releasing the GIL (``time.sleep``, as a GPU kernel leaves the CPU free) and
returns smooth similarities of the real shape (classes x 28 x 28 for 448 px). Everything else is
the real worker: tar shards on disk, Pillow decode, resize, label maps at the image's own size,
COCO RLE, Parquet. Two image sets: real VOC photos (JPEG) and generated 1920x1080 JPEGs.

For each set it measures
  1. the CPU cost of every stage, ms per image, in sequential mode with a zero-time model, and the
     cores a GPU labelling 2,000 images/s would need at that cost;
  2. what the CPU stages sustain with the overlapped stages and a zero-time model;
  3. for stand-in rates below that (fractions of it), end-to-end images/s of the overlapped worker,
     the same stages run sequentially, and today's worker (``git show REV:pipeline/worker.py``),
     each as a fraction of the stand-in's rate, round-robin in one run.

GPU mode (``--gpu``): the real model (random weights) on CUDA, bf16; model-only images/s over a
batch-size sweep, the fast vs the naive GEM path, and end-to-end images/s with GPU and CPU decode.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.runner import build_spec  # noqa: E402
from pipeline.shards import Shard  # noqa: E402
from tests.shards import write_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = [ROOT / "tests/data/voc", Path("/work/shared/data/voc2012-val-crops")]
CLASSES = ["person", "dog", "cat", "sofa", "car", "bus", "bird", "chair", "table", "plant"]
STAGES = ("read_s", "decode_s", "resize_s", "postprocess_s", "rle_s", "write_s")


def photos() -> list[Image.Image]:
    paths = sorted(p for folder in PHOTO_DIRS if folder.is_dir() for p in folder.glob("*_image.png"))
    return [Image.open(p).convert("RGB") for p in paths]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def hd_image(source: Image.Image, seed: int) -> Image.Image:
    """A 1920x1080 photo-like image: a VOC photo upscaled, with sensor-like noise for detail."""
    rng = np.random.default_rng(seed)
    array = np.asarray(source.resize((1920, 1080), Image.Resampling.BICUBIC), dtype=np.float32)
    array += rng.normal(0, 6, array.shape).astype(np.float32)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def make_shard(folder: Path, name: str, images: list[bytes]) -> str:
    samples = [{"__key__": f"{name}-{i:05d}", "jpg": data} for i, data in enumerate(images)]
    return str(write_shard(folder / f"{name}.tar", samples))


class StandIn:
    """A model that takes ``seconds`` per batch with the GIL released, returning (B, C, h, w)
    similarities with a few smooth regions per image, like a real segmenter's."""

    def __init__(self, classes: int, grid: tuple[int, int]):
        self.classes, self.grid, self.seconds = classes, grid, 0.0
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, images: torch.Tensor, vocabulary=None) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        coarse = torch.rand(images.shape[0], self.classes, 4, 4, generator=self.generator)
        return 0.15 + 0.2 * F.interpolate(coarse, size=self.grid, mode="bilinear", align_corners=False)


def legacy_labeler_class(rev: str):
    """Today's worker (before the overlapped stages), loaded from git as a module."""
    source = subprocess.run(["git", "show", f"{rev}:pipeline/worker.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("legacy_worker", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["legacy_worker"] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:pipeline/worker.py", "exec"), module.__dict__)
    return module.ShardLabeler


def baseline_rev() -> str:
    result = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "main"


def build_labelers(out: Path, args) -> dict:
    from pipeline.worker import ShardLabeler
    config = load_config(None, {
        "input": ["unused.tar"], "output": str(out), "vocab": CLASSES, "model": "gemtest-micro",
        "model_config": str(ROOT / "tests/data/models/gemtest-micro.json"), "pretrained": "none",
        "gem": {"depth": 3}, "input_size": [448, 448], "batch_size": args.batch, "decode_threads": args.decode_threads,
        "postprocess_threads": args.postprocess_threads, "progress": False, "decode": "cpu"})
    spec = build_spec(config)
    stand_in = StandIn(len(CLASSES), (448 // 16, 448 // 16))
    overlapped = ShardLabeler(spec, device="cpu", torch_threads=1)
    sequential = ShardLabeler(spec, device="cpu", torch_threads=1)
    sequential.stage_settings = replace(sequential.stage_settings, sequential=True)
    labelers = {"overlapped": overlapped, "sequential": sequential}
    if not args.no_legacy:
        labelers["today"] = legacy_labeler_class(args.baseline_rev or baseline_rev())(spec, device="cpu",
                                                                                       torch_threads=1)
    for labeler in labelers.values():
        labeler.segmenter.patch_similarities = stand_in
    return {"labelers": labelers, "stand_in": stand_in}


def run_shard(labeler, url: str, name: str) -> tuple[float, dict]:
    start = time.perf_counter()
    marker = labeler.label_shard(Shard(url, name))
    return marker["samples"] / (time.perf_counter() - start), marker


def bench_set(name: str, url: str, images: int, setup: dict, args) -> dict:
    labelers, stand_in = setup["labelers"], setup["stand_in"]
    stand_in.seconds = 0.0
    run_shard(labelers["overlapped"], url, name)  # warm-up: page cache, allocator, text encodes
    _, marker = run_shard(labelers["sequential"], url, name)
    cost_ms = {k[:-2]: 1000 * marker["timings"].get(k, 0.0) / images for k in STAGES}
    capacity, _ = run_shard(labelers["overlapped"], url, name)
    result = {"images": images, "cpu_ms_per_image": {k: round(v, 2) for k, v in cost_ms.items()},
              "cpu_ms_per_image_total": round(sum(cost_ms.values()), 2),
              "cores_per_gpu_at_2000_img_s": round(sum(cost_ms.values()) * 2000 / 1000, 1),
              "cpu_stages_img_s": round(capacity, 2), "rates": []}
    for fraction in args.fractions:
        target = fraction * capacity
        stand_in.seconds = args.batch / target
        row = {"fraction_of_cpu_capacity": fraction, "stand_in_img_s": round(target, 2)}
        for variant, labeler in labelers.items():
            rate, marker = run_shard(labeler, url, name)
            row[variant] = round(rate / target, 3)
            if variant == "overlapped":
                row["overlapped_waits_s"] = {k: round(v, 2) for k, v in marker["timings"].items()
                                             if k.endswith(("_wait_s", "_blocked_s"))}
        if "today" in row:
            row["overlapped_vs_today"] = round(row["overlapped"] / row["today"], 3)
        row["overlapped_vs_sequential"] = round(row["overlapped"] / row["sequential"], 3)
        result["rates"].append(row)
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    return result


def bench_gpu(args) -> dict:  # pragma: no cover - needs a GPU
    """Model-only and end-to-end images/s of ViT-B-16 at 448 on CUDA, bf16, random weights."""
    from gem import GEMSegmenter, GEMSettings, load_clip
    from pipeline.config import load_config as load
    from pipeline.worker import ShardLabeler
    results: dict = {"card": torch.cuda.get_device_name(), "model_only": {}, "end_to_end": {}}
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", None, "cuda")
    for fast in (True, False):
        segmenter = GEMSegmenter(clip, GEMSettings(), device="cuda", precision="bf16", fast=fast)
        vocab = segmenter.vocabulary(CLASSES)
        for batch in args.gpu_batches:
            images = torch.randn(batch, 3, 448, 448, device="cuda")
            for _ in range(3):
                segmenter.patch_similarities(images, vocab)
            torch.cuda.synchronize()
            start, rounds = time.perf_counter(), 10
            for _ in range(rounds):
                segmenter.patch_similarities(images, vocab)
            torch.cuda.synchronize()
            results["model_only"][f"{'fast' if fast else 'naive'}-b{batch}"] = round(
                rounds * batch / (time.perf_counter() - start), 1)
        print(json.dumps(results), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pictures = photos()
        hd = [jpeg(hd_image(pictures[i % len(pictures)], i)) for i in range(args.gpu_images)]
        url = make_shard(Path(tmp), "gpu-hd", hd)
        for decode in ("gpu", "cpu"):
            for batch in args.gpu_batches:
                config = load(None, {"input": [url], "output": f"{tmp}/out-{decode}-{batch}", "vocab": CLASSES,
                                     "pretrained": "none", "batch_size": batch, "decode": decode,
                                     "decode_threads": args.decode_threads, "progress": False})
                labeler = ShardLabeler(build_spec(config), device="cuda", torch_threads=2)
                run_shard(labeler, url, "gpu-hd")
                rate, marker = run_shard(labeler, url, "gpu-hd")
                results["end_to_end"][f"{decode}-decode-b{batch}"] = {"img_s": round(rate, 1),
                                                                     "timings": marker["timings"]}
                print(json.dumps(results["end_to_end"]), file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="VOC photos in the VOC shard (cycled)")
    parser.add_argument("--hd-images", type=int, default=40, help="1920x1080 JPEGs in the HD shard")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (stand-in mode: 1 per thread)")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--postprocess-threads", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8],
                        help="stand-in rates as fractions of what the CPU stages sustain")
    parser.add_argument("--sets", nargs="+", default=["voc", "hd"])
    parser.add_argument("--baseline-rev", default=None, help="git revision of today's worker (default: merge-base with main)")
    parser.add_argument("--no-legacy", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="measure the real model on CUDA instead")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--gpu-images", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1 if not args.gpu else args.threads)
    if args.gpu:
        print(json.dumps(bench_gpu(args), indent=1))
        return
    from tests.models import register_test_models
    register_test_models()
    report = {"args": vars(args), "torch": torch.__version__, "uptime": os.getloadavg(), "sets": {}}
    pictures = photos()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup = build_labelers(folder / "out", args)
        data = {"voc": [jpeg(pictures[i % len(pictures)]) for i in range(args.images)],
                "hd": [jpeg(hd_image(pictures[i % len(pictures)], i)) for i in range(args.hd_images)]}
        for name in args.sets:
            url = make_shard(folder, name, data[name])
            report["sets"][name] = bench_set(name, url, len(data[name]), setup, args)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
