"""Methods and inference layouts: images/s on VOC photos, with and without PAMR; PAMR's memory.

    python -m bench.bench_methods --threads 2 --images 2
    python -m bench.bench_methods --threads 2 --pamr-memory-only --megapixels 12

Random-weight ViT-B-16 (``open_clip.create_model('ViT-B-16')``, weights do not change the
arithmetic), the VOC photos of tests/data/voc cropped to 500x375 (VOC's commonest size), the 20 VOC classes + 3 background names, one
template (the text side is encoded once per run and not timed). Variants, all in one run:

  gem-448-whole        GEM, image squashed to 448x448, whole image (gemlabel's default)
  gem-448-slide        GEM, short side 448, 448/224 sliding windows (the papers' GEM protocol)
  naclip-336-slide     NACLIP head, short side 336, 224/112 windows (the NACLIP preset)

each timed as model (``dense_logits``) + post-processing at the photo's size (``regions``),
the latter without and with PAMR (10 steps, dilations 8 and 16); the model part is shared by
the two, so each rate is images / (model + post-processing). Rates are reported as ratios to
gem-448-whole without PAMR.

PAMR memory: a subprocess refines a synthetic image of N megapixels band by band
(``gem.dense.top_class_bands``) and reports its peak resident memory above what it held before
(VmHWM - VmRSS, Linux), against the size of one full-resolution (words, H, W) float32 tensor.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
               "tv monitor"]
BACKGROUND = ["sky", "wall", "grass"]
PHOTOS = sorted((Path(__file__).parent.parent / "tests" / "data" / "voc").glob("*_image.png"))

MEMORY_SCRIPT = r"""
import json, sys, time, torch
from gem.dense import top_class_bands
from gem.pamr import PAMRSettings
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
height, width, words = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
logits = torch.randn(words, height // 16, width // 16) * 0.05   # model-grid logits (patch 16)
image = torch.randn(3, height // 4, width // 4)                  # a model input, upsampled per band
word_class = torch.arange(words) % (words - 1)
before = status("VmRSS")
start = time.perf_counter()
rows = sum(top.shape[0] for _, top, _ in top_class_bands(
    logits, (height, width), word_class, words - 1, 40.0, 0.1, PAMRSettings(10, (8, 16)), image))
seconds = time.perf_counter() - start
print(json.dumps({"rows": rows, "seconds": seconds, "peak_above_start_bytes": status("VmHWM") - before}))
"""


def centre_crop(image, width: int, height: int):
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def make_segmenter(method: str, resize, slide, pamr, threads: int):
    from gem import GEMSegmenter, GEMSettings, InferenceSettings
    from gem.loading import LoadedCLIP
    from gem.preprocess import OPENAI_MEAN, OPENAI_STD
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")
    clip = LoadedCLIP(model, open_clip.get_tokenizer("ViT-B-16"), OPENAI_MEAN, OPENAI_STD)
    return GEMSegmenter(clip, GEMSettings(method=method), device="cpu", precision="fp32",
                        inference=InferenceSettings(resize, slide, pamr, max_batch=8))


def bench_variants(images: int, threads: int) -> dict:
    from PIL import Image
    from gem import LabelingThresholds, PAMRSettings, ResizeSettings, SlideWindows
    from gem.windows import window_boxes
    torch.set_num_threads(threads)
    # The VOC crops in tests/data/voc are 513x513; a centred 500x375 crop is VOC's commonest size.
    photos = [centre_crop(Image.open(path).convert("RGB"), 500, 375) for path in PHOTOS[:images]]
    variants = {
        "gem-448-whole": ("gem", ResizeSettings("square", (448, 448)), None),
        "gem-448-slide": ("gem", ResizeSettings("short_side", short_side=448), SlideWindows(448, 224)),
        "naclip-336-slide": ("naclip", ResizeSettings("short_side", short_side=336), SlideWindows(224, 112)),
    }
    thresholds = LabelingThresholds(logit_scale=40.0, background_threshold=0.1)
    results = {}
    for name, (method, resize, slide) in variants.items():
        plain = make_segmenter(method, resize, slide, None, threads)
        refined = make_segmenter(method, resize, slide, PAMRSettings(10, (8, 16)), threads)
        vocabulary = plain.vocabulary(VOC_CLASSES, "single", BACKGROUND)
        inputs = [plain.model_input(photo) for photo in photos]
        plain.dense_logits(inputs[:1], vocabulary)  # warm-up
        start = time.perf_counter()
        logits = plain.dense_logits(inputs, vocabulary)
        model_s = time.perf_counter() - start
        post = {}
        for label, segmenter in (("no_pamr", plain), ("pamr", refined)):
            start = time.perf_counter()
            for item, tensor, photo in zip(logits, inputs, photos):
                segmenter.regions(item, (photo.height, photo.width), vocabulary, thresholds, tensor)
            post[label] = time.perf_counter() - start
        results[name] = {
            "model_input": list(inputs[0].shape[-2:]), "windows_per_image": None if slide is None else
            len(window_boxes(*inputs[0].shape[-2:], slide.crop, slide.stride)),
            "model_s": model_s, "post_s": post["no_pamr"], "post_pamr_s": post["pamr"],
            "images_per_s": len(photos) / (model_s + post["no_pamr"]),
            "images_per_s_pamr": len(photos) / (model_s + post["pamr"]),
        }
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    base = results["gem-448-whole"]["images_per_s"]
    for result in results.values():
        result["ratio"] = result["images_per_s"] / base
        result["ratio_pamr"] = result["images_per_s_pamr"] / base
    return results


def bench_pamr_memory(megapixels: float, words: int) -> dict:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(height), str(width), str(words)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(height=height, width=width, words=words,
                  full_resolution_logits_bytes=words * height * width * 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--words", type=int, default=8, help="vocabulary words in the PAMR memory run")
    parser.add_argument("--pamr-memory-only", action="store_true")
    parser.add_argument("--skip-pamr-memory", action="store_true")
    args = parser.parse_args()
    report = {}
    if not args.pamr_memory_only:
        report["variants"] = bench_variants(args.images, args.threads)
    if not args.skip_pamr_memory:
        report["pamr_memory"] = bench_pamr_memory(args.megapixels, args.words)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
