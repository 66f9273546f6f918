"""Does the worker keep an accelerator fed? A stand-in model on this machine, or the real one on a GPU.

    python -m bench.bench_feed --images 128 --hd-images 96 --shards 4 --batch 8

Stand-in mode (default; no GPU needed): the model is replaced by a stand-in that takes a fixed
time per batch while releasing the GIL (``time.sleep``, as a GPU kernel leaves the CPU free) and
returns smooth similarities of the real shape (classes x 28 x 28 for 448 px). Everything else is
the real worker: tar shards on disk, Pillow decode, resize, label maps at the image's own size,
COCO RLE, Parquet. Two image sets: real VOC photos (JPEG) and generated 1920x1080 JPEGs, each
split into ``--shards`` shards labelled by one worker, as a run of several shards is.

For each set it measures
  1. the CPU cost of every stage, ms per image, in sequential mode with a zero-time model, and the
     cores a GPU labelling 2,000 images/s would need at that cost;
  2. what the CPU stages sustain with the overlapped stages and a zero-time model;
  3. for stand-in rates below that (fractions of it), end-to-end images/s over all the shards of
     the overlapped worker holding two shards at once (as Ray runs it, ``shards_per_worker: 2``),
     the same worker one shard at a time, the same stages run sequentially, and the worker before
     issue 12 ("today" in the issue: ``--baseline-rev``, run from an export of that revision in a
     process of its own, ``bench/feed_legacy.py``), each as a fraction of the stand-in's rate,
     variant after variant in one run.

GPU mode (``--gpu``): the real model (random weights) on CUDA, bf16; model-only images/s over a
batch-size sweep, the fast vs the naive GEM path, and end-to-end images/s with GPU and CPU decode.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.driver.plan import build_spec  # noqa: E402
from pipeline.io.shards import Shard  # noqa: E402
from bench.feed_legacy import CLASSES, StandIn  # noqa: E402
from tests.shards import write_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = [ROOT / "tests/data/voc", Path("/work/shared/data/voc2012-val-crops")]
BASELINE_REV = "bc19c8f"  # the last commit before the overlapped stages (issue 12)
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


class LegacyWorker:
    """Today's worker before issue 12 (``--baseline-rev``), in a process of its own run from an
    export of that revision (``bench/feed_legacy.py``), fed the same shards."""

    def __init__(self, rev: str, folder: Path, args):
        export = folder / f"legacy-{rev}"
        export.mkdir()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench/feed_legacy.py"), str(folder / "out-legacy"),
             str(ROOT / "tests/data/models/gemtest-micro.json"), str(args.batch), str(args.decode_threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(export)}, cwd=str(export))
        assert json.loads(self.process.stdout.readline())["ready"]

    def run(self, urls: list[str], seconds: float) -> float:
        self.process.stdin.write(json.dumps({"seconds": seconds, "urls": urls}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["img_s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def build_labelers(out: Path, args):
    from pipeline.worker.labeler import ShardLabeler
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
    for labeler in (overlapped, sequential):
        labeler.segmenter.patch_similarities = stand_in
    return overlapped, sequential, stand_in


def run_shards(labeler, urls: list[str], slots: int) -> tuple[float, list[dict]]:
    """Images/s of labelling ``urls`` on one worker holding ``slots`` shards at once, as Ray runs
    it (``shards_per_worker``: that many label_shard calls in flight on the actor)."""
    shards = [Shard(url, Path(url).stem) for url in urls]
    start = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        markers = list(pool.map(labeler.label_shard, shards))
    return sum(m["samples"] for m in markers) / (time.perf_counter() - start), markers


def cores_per_gpu(cost_ms: dict[str, float], rate: float = 2000.0) -> dict[str, float]:
    """CPU cores a GPU labelling ``rate`` images/s would keep busy at these per-stage costs: with
    every stage on the CPU; with the label maps on the GPU (as a GPU worker computes them); and
    with JPEG decode and resize there too (``decode: gpu``)."""
    on_cpu = {"all_on_cpu": STAGES, "label_maps_on_gpu": tuple(k for k in STAGES if k != "postprocess_s"),
              "decode_resize_label_maps_on_gpu": ("read_s", "rle_s", "write_s")}
    return {name: round(sum(cost_ms[k[:-2]] for k in keys) * rate / 1000, 1) for name, keys in on_cpu.items()}


def bench_set(name: str, urls: list[str], images: int, setup, legacy: Optional[LegacyWorker], args) -> dict:
    overlapped, sequential, stand_in = setup
    stand_in.seconds = 0.0
    run_shards(overlapped, urls[:1], 1)  # warm-up: page cache, allocator, text encodes
    _, markers = run_shards(sequential, urls, 1)
    cost_ms = {k[:-2]: 1000 * sum(m["timings"].get(k, 0.0) for m in markers) / images for k in STAGES}
    capacity, _ = run_shards(overlapped, urls, 2)
    result = {"images": images, "shards": len(urls), "cpu_ms_per_image": {k: round(v, 2) for k, v in cost_ms.items()},
              "cpu_ms_per_image_total": round(sum(cost_ms.values()), 2),
              "cores_per_gpu_at_2000_img_s": cores_per_gpu(cost_ms),
              "cpu_stages_img_s": round(capacity, 2), "rates": []}
    variants = {"overlapped": lambda: run_shards(overlapped, urls, 2)[0],
                "one_shard_at_a_time": lambda: run_shards(overlapped, urls, 1)[0],
                "sequential": lambda: run_shards(sequential, urls, 1)[0]}
    if legacy is not None:
        variants["today"] = lambda: legacy.run(urls, stand_in.seconds)
    for fraction in args.fractions:
        target = fraction * capacity
        stand_in.seconds = args.batch / target
        row = {"fraction_of_cpu_capacity": fraction, "stand_in_img_s": round(target, 2)}
        for variant, run in variants.items():
            row[variant] = round(run() / target, 3)
        for other in ("today", "one_shard_at_a_time", "sequential"):
            if other in row:
                row[f"overlapped_vs_{other}"] = round(row["overlapped"] / row[other], 3)
        result["rates"].append(row)
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    return result


def bench_gpu(args) -> dict:  # the CUDA numbers need a GPU; --device cpu runs the same code small
    """Model-only and end-to-end images/s of the real model (random weights) on ``--device``:
    bf16 on CUDA. End to end: generated 1920x1080 JPEGs in ``--shards`` shards on one worker
    holding two at once, with GPU (CUDA only) and CPU JPEG decode; each as a share of model-only."""
    from gem import GEMSegmenter, GEMSettings, load_clip
    from pipeline.config import load_config as load
    from pipeline.worker.labeler import ShardLabeler
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = args.input_size
    results: dict = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                     "model": args.model, "input_size": size, "model_only": {}, "end_to_end": {}}
    torch.manual_seed(0)
    clip = load_clip(args.model, None, device)
    for fast in (True, False):
        segmenter = GEMSegmenter(clip, GEMSettings(depth=args.depth), device=device, precision="auto", fast=fast)
        vocab = segmenter.vocabulary(CLASSES)
        for batch in args.gpu_batches:
            images = torch.randn(batch, 3, size, size, device=device)
            for _ in range(3):
                segmenter.patch_similarities(images, vocab)
            sync()
            start, rounds = time.perf_counter(), 10
            for _ in range(rounds):
                segmenter.patch_similarities(images, vocab)
            sync()
            results["model_only"][f"{'fast' if fast else 'naive'}-b{batch}"] = round(
                rounds * batch / (time.perf_counter() - start), 1)
        print(json.dumps(results), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pictures = photos()
        hd = [jpeg(hd_image(pictures[i % len(pictures)], i)) for i in range(args.gpu_images)]
        per_shard = -(-len(hd) // args.shards)
        urls = [make_shard(Path(tmp), f"gpu-hd-{k}", hd[k * per_shard:(k + 1) * per_shard]) for k in range(args.shards)]
        for decode in ("gpu", "cpu") if cuda else ("cpu",):
            for batch in args.gpu_batches:
                config = load(None, {"input": urls, "output": f"{tmp}/out-{decode}-{batch}", "vocab": CLASSES,
                                     "model": args.model, "pretrained": "none", "gem": {"depth": args.depth},
                                     "input_size": [size, size], "batch_size": batch, "decode": decode,
                                     "decode_threads": args.decode_threads, "progress": False})
                labeler = ShardLabeler(build_spec(config), device=str(device), torch_threads=args.threads)
                run_shards(labeler, urls[:1], 1)  # warm-up
                rate, markers = run_shards(labeler, urls, 2)
                results["end_to_end"][f"{decode}-decode-b{batch}"] = {
                    "img_s": round(rate, 1), "of_model_only": round(rate / results["model_only"][f"fast-b{batch}"], 3),
                    "timings": markers[-1]["timings"]}
                print(json.dumps(results["end_to_end"]), file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="VOC photos (cycled), split into --shards shards")
    parser.add_argument("--hd-images", type=int, default=96, help="1920x1080 JPEGs, split into --shards shards")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (stand-in mode: 1 per thread)")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--postprocess-threads", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8],
                        help="stand-in rates as fractions of what the CPU stages sustain")
    parser.add_argument("--sets", nargs="+", default=["voc", "hd"])
    parser.add_argument("--shards", type=int, default=4, help="shards each image set is split into")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision of the worker before issue 12 ('today' in the issue)")
    parser.add_argument("--no-legacy", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="measure the real model (on --device) instead")
    parser.add_argument("--device", default="cuda", help="with --gpu: cuda, or cpu to run the same code small")
    parser.add_argument("--model", default="ViT-B-16", help="with --gpu: the open_clip model (random weights)")
    parser.add_argument("--depth", type=int, default=7, help="with --gpu: gem.depth")
    parser.add_argument("--input-size", type=int, default=448, help="with --gpu: the model input's side")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--gpu-images", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1 if not args.gpu else args.threads)
    from tests.models import register_test_models
    register_test_models()
    if args.gpu:
        print(json.dumps(bench_gpu(args), indent=1))
        return
    report = {"args": vars(args), "torch": torch.__version__, "uptime": os.getloadavg(), "sets": {}}
    pictures = photos()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup = build_labelers(folder / "out", args)
        legacy = None if args.no_legacy else LegacyWorker(args.baseline_rev, folder, args)
        data = {"voc": [jpeg(pictures[i % len(pictures)]) for i in range(args.images)],
                "hd": [jpeg(hd_image(pictures[i % len(pictures)], i)) for i in range(args.hd_images)]}
        try:
            for name in args.sets:
                per_shard = -(-len(data[name]) // args.shards)
                urls = [make_shard(folder, f"{name}-{k}", data[name][k * per_shard:(k + 1) * per_shard])
                        for k in range(args.shards)]
                report["sets"][name] = bench_set(name, urls, len(data[name]), setup, legacy, args)
        finally:
            if legacy is not None:
                legacy.close()
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
