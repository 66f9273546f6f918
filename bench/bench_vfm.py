"""GEM alone vs ProxyCLIP, and SAM refinement on each: images/s on the same photos, as ratios to GEM.

    python -m bench.bench_vfm --threads 2 --images 2                 # CPU, tiny random models (< 1 min)
    python -m bench.bench_vfm --threads 2 --images 2 --models real   # CPU, real-size models (minutes)
    python -m bench.bench_vfm --device cuda --images 64              # GPU, real-size random-weight models

All run the same inference layout (ProxyCLIP's preset: short side 336, 336/112 sliding windows) on
the VOC photos of tests/data/voc cropped to 500x375, the 20 VOC classes + 3 background names, one
template (text encoded once, not timed). Each is timed per stage as a worker runs it (bf16 on a
GPU, fp32 on the CPU):

- model_s: ``dense_logits`` of the whole batch (its windows batched), on the model thread;
- sam_input_s: SAM's encoder input (resize to longest side 1024), on a worker's decode threads;
- sam_embed_s: SAM's embeddings of the whole batch in ``SAM_BATCH`` chunks, on the model thread;
- post_s: per photo at its own size ``label_map`` (GEM, ProxyCLIP) or ``refined_label_map``
  (prompts, one batched decoder call per class, the merge), then the regions' RLE.

SAM's IoU threshold is set below every score so that every prompt's mask is merged (random SAMs'
IoUs mean nothing; this is the refinement's worst case). ``gpu_share`` is the part of the time a
GPU worker spends on its device (everything but sam_input_s and the RLE, which are on its CPUs).

Models (random weights: they do not change the arithmetic):
  tiny: CLIP 4 x 128 wide, patch 16 (GEM depth 4); DINO ViT/8 3 x 96 wide; SAM encoder 2 x 64 wide at 1024
  real: CLIP ViT-B-16; DINO ViT-B/8 (timm's vit_base_patch8_224 recipe); SAM ViT-B
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
               "tv monitor"]
BACKGROUND = ["sky", "wall", "grass"]
PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "data" / "voc").glob("*_image.png"))

TINY_CLIP = {"embed_dim": 64, "quick_gelu": True,
             "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}
TINY_VFM = {"embed_dim": 96, "depth": 3, "num_heads": 3}
TINY_SAM = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": [1],
            "prompt_embed_dim": 64, "decoder_mlp_dim": 512, "iou_head_hidden_dim": 64}


def centre_crop(image, width: int, height: int):
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def models(real: bool):
    from gem.torchvision_shim import import_torchvision
    import_torchvision()
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    from gem.loading import LoadedCLIP
    from gem.preprocess import OPENAI_MEAN, OPENAI_STD
    from gem.sam import build_sam
    from gem.vfm import build_vfm
    torch.manual_seed(0)
    tiny = not real
    if tiny:
        _MODEL_CONFIGS.setdefault("bench-vfm-tiny", TINY_CLIP)
    name = "bench-vfm-tiny" if tiny else "ViT-B-16"
    clip = LoadedCLIP(open_clip.create_model(name).eval(), open_clip.get_tokenizer(name), OPENAI_MEAN, OPENAI_STD)
    vfm = build_vfm("dino_vitb8", TINY_VFM if tiny else None)
    sam = build_sam("vit_b", TINY_SAM if tiny else None)
    return clip, vfm, sam


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    from PIL import Image
    from gem import GEMSegmenter, GEMSettings, InferenceSettings, LabelingThresholds, ResizeSettings, SlideWindows
    from gem.postprocess import class_regions
    from gem.sam_refine import SAMRefiner
    from gem.settings import SAMRefineSettings
    from pipeline.worker.refine import SAM_BATCH
    torch.set_num_threads(args.threads)
    clip, vfm, sam = models(args.models == "real")
    photos = [centre_crop(Image.open(path).convert("RGB"), 500, 375) for path in PHOTOS]
    photos = (photos * (1 + args.images // len(photos)))[:args.images]
    inference = InferenceSettings(ResizeSettings("short_side", short_side=336), SlideWindows(336, 112), max_batch=16)
    thresholds = LabelingThresholds(logit_scale=40.0, background_threshold=0.2)
    segmenters = {
        "gem": GEMSegmenter(clip, GEMSettings(depth=min(7, len(clip.model.visual.transformer.resblocks))),
                            device=args.device, precision=args.precision, inference=inference),
        "proxyclip": GEMSegmenter(clip, GEMSettings(method="proxyclip"), device=args.device,
                                  precision=args.precision, inference=inference, vfm=vfm),
    }
    refiner = SAMRefiner(sam.to(args.device), SAMRefineSettings(iou_thresh=-1e9))
    arrays = [np.asarray(photo) for photo in photos]
    results = {}
    for name in ("gem", "gem+sam", "proxyclip", "proxyclip+sam"):
        segmenter = segmenters[name.split("+")[0]]
        refine = name.endswith("+sam")
        vocabulary = segmenter.vocabulary(VOC_CLASSES, "single", BACKGROUND)
        inputs = [segmenter.model_input(photo) for photo in photos]

        def label_all(count: int) -> dict:
            times = dict.fromkeys(("model_s", "sam_input_s", "sam_embed_s", "post_s", "rle_s"), 0.0)
            prompts, clock = 0, time.perf_counter()
            sam_inputs = [refiner.encoder_input(array) for array in arrays[:count]] if refine else []
            times["sam_input_s"] = time.perf_counter() - clock
            clock = time.perf_counter()
            logits = segmenter.dense_logits(inputs[:count], vocabulary)
            synchronize(args.device)
            times["model_s"], clock = time.perf_counter() - clock, time.perf_counter()
            if refine:
                with segmenter.autocast():
                    embeddings = refiner.embed_inputs(sam_inputs, SAM_BATCH)
                synchronize(args.device)
                times["sam_embed_s"] = time.perf_counter() - clock
            for index, (item, photo) in enumerate(zip(logits, photos[:count])):
                clock = time.perf_counter()
                size = (photo.height, photo.width)
                if refine:
                    labels, stats, refined = segmenter.refined_label_map(item, size, vocabulary, refiner, None,
                                                                         thresholds, embeddings[index])
                    prompts += len(refined.passed)
                else:
                    labels, stats = segmenter.label_map(item, size, vocabulary, thresholds)
                synchronize(args.device)
                times["post_s"] += time.perf_counter() - clock
                clock = time.perf_counter()
                list(class_regions(labels, stats))
                times["rle_s"] += time.perf_counter() - clock
            return {**times, **({"sam_prompts": prompts} if refine else {})}

        with torch.no_grad():
            label_all(1)  # warm-up (kernels, caches)
            synchronize(args.device)
            start = time.perf_counter()
            extra = label_all(len(photos))
            synchronize(args.device)
        seconds = time.perf_counter() - start
        device_s = extra["model_s"] + extra["sam_embed_s"] + extra["post_s"]
        results[name] = {"seconds": seconds, "images_per_s": len(photos) / seconds,
                         "device_s_per_image": device_s / len(photos), "gpu_share": device_s / seconds,
                         "model_input": list(inputs[0].shape[-2:]), **extra}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    base, base_device = results["gem"]["images_per_s"], results["gem"]["device_s_per_image"]
    for result in results.values():
        result["ratio_to_gem"] = result["images_per_s"] / base
        # device work per image as a multiple of GEM's: the GPUs it takes where GEM takes one
        result["device_cost_x_gem"] = result["device_s_per_image"] / base_device
    results["proxyclip+sam"]["ratio_to_proxyclip"] = (results["proxyclip+sam"]["images_per_s"]
                                                      / results["proxyclip"]["images_per_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--models", choices=("tiny", "real"), default=None,
                        help="model sizes (default: tiny on CPU, real on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16 (default: fp32 on CPU, auto on CUDA)")
    args = parser.parse_args()
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "auto")
    args.models = args.models or ("tiny" if args.device == "cpu" else "real")
    results = run(args)
    print(json.dumps({"device": args.device, "models": args.models, "images": args.images,
                      "precision": args.precision, "results": results},
                     indent=1))
    for name, result in results.items():
        print(f"{name:>14}: {result['images_per_s']:.3f} images/s, {result['ratio_to_gem']:.3f} x GEM's rate, "
              f"device work {result['device_cost_x_gem']:.2f} x GEM's")


if __name__ == "__main__":
    main()
