"""GEM alone vs ProxyCLIP vs ProxyCLIP + SAM refinement: images/s on the same photos, as ratios to GEM.

    python -m bench.bench_vfm --threads 2 --images 2                 # CPU, tiny random models (< 1 min)
    python -m bench.bench_vfm --device cuda --images 8               # real-size random-weight models

All three run the same inference layout (ProxyCLIP's preset: short side 336, 336/112 sliding
windows) on the VOC photos of tests/data/voc cropped to 500x375, the 20 VOC classes + 3 background
names, one template (text encoded once, not timed). Each is timed end to end per batch: the model
(``dense_logits``), then per photo at its own size either ``regions`` (GEM, ProxyCLIP) or
``refined_label_map`` + regions (ProxyCLIP + SAM: SAM's image embedding, one batched decoder call
per class with prompts, the merge). SAM's IoU threshold is set below every score so that every
prompt's mask is merged (random SAMs' IoUs mean nothing; this is the refinement's worst case).

Models (random weights: they do not change the arithmetic):
  cpu:  CLIP 4 x 128 wide, patch 16 (GEM depth 4); DINO ViT/8 3 x 96 wide; SAM encoder 2 x 64 wide at 1024, decoder 64 wide
  cuda: CLIP ViT-B-16; DINO ViT-B/8 (timm's vit_base_patch8_224 recipe); SAM ViT-B
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


def models(device: str):
    from gem.torchvision_shim import import_torchvision
    import_torchvision()
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS
    from gem.loading import LoadedCLIP
    from gem.preprocess import OPENAI_MEAN, OPENAI_STD
    from gem.sam import build_sam
    from gem.vfm import build_vfm
    torch.manual_seed(0)
    tiny = device == "cpu"
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
    torch.set_num_threads(args.threads)
    clip, vfm, sam = models(args.device)
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
    for name in ("gem", "proxyclip", "proxyclip+sam"):
        segmenter = segmenters[name.split("+")[0]]
        vocabulary = segmenter.vocabulary(VOC_CLASSES, "single", BACKGROUND)
        inputs = [segmenter.model_input(photo) for photo in photos]

        def label_all(count: int) -> dict:
            prompts = 0
            logits = segmenter.dense_logits(inputs[:count], vocabulary)
            for item, photo, array in zip(logits, photos[:count], arrays[:count]):
                size = (photo.height, photo.width)
                if name.endswith("+sam"):
                    labels, stats, refined = segmenter.refined_label_map(item, size, vocabulary, refiner, array,
                                                                         thresholds)
                    prompts += len(refined.passed)
                else:
                    labels, stats = segmenter.label_map(item, size, vocabulary, thresholds)
                list(class_regions(labels, stats))
            return {"sam_prompts": prompts}

        with torch.no_grad():
            label_all(1)  # warm-up (kernels, caches)
            synchronize(args.device)
            start = time.perf_counter()
            extra = label_all(len(photos))
            synchronize(args.device)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "images_per_s": len(photos) / seconds,
                         "model_input": list(inputs[0].shape[-2:]), **({} if name != "proxyclip+sam" else extra)}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    base = results["gem"]["images_per_s"]
    for result in results.values():
        result["ratio_to_gem"] = result["images_per_s"] / base
    results["proxyclip+sam"]["ratio_to_proxyclip"] = (results["proxyclip+sam"]["images_per_s"]
                                                      / results["proxyclip"]["images_per_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16 (default: fp32 on CPU, auto on CUDA)")
    args = parser.parse_args()
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "auto")
    results = run(args)
    print(json.dumps({"device": args.device, "images": args.images, "precision": args.precision, "results": results},
                     indent=1))
    for name, result in results.items():
        print(f"{name:>14}: {result['images_per_s']:.3f} images/s, {result['ratio_to_gem']:.3f} x GEM")


if __name__ == "__main__":
    main()
