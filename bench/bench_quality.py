"""Cost of measuring quality: `gemlabel eval` against `gemlabel label` on the same images, and
`gemlabel calibrate`'s cost per grid point against its one model pass.

    python -m bench.bench_quality --model ViT-B-16 --input-size 224 --copies 2 --threads 2

Same process, same local Ray cluster, same random-weight model and config for every variant. Images:
the VOC photos and masks in tests/data/voc-val (513x513), each repeated --copies times under
distinct keys. Reported (seconds, and as ratios in the same run):
  label            run_labeling on the packed shards (actor start, model load, labelling, writing);
                   run before and after eval, the mean is used
  eval             what `gemlabel eval` does: pack, the same run_labeling, read the output, score
  eval_scoring     of which: reading the Parquet back, decoding RLE, scoring
  calibrate_model  calibrate's one model pass over the images (similarities kept)
  calibrate_point  one grid point: post-processing + scoring of every image
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.quality.calibrate import Grid, compute_similarities, sweep  # noqa: E402
from pipeline.quality.classmap import build_mapping  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.quality.evaluate import label_ground_truth, read_output_rows, score_rows, write_image_shards  # noqa: E402
from pipeline.quality.groundtruth import GroundTruth, folder_ground_truth  # noqa: E402
from pipeline.driver.plan import build_spec
from pipeline.driver.run import run_labeling  # noqa: E402
from pipeline.worker.labeler import load_segmenter  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "voc-val"
VOCAB = ["person", "car", "bus", "cow", "horse", "motorbike", "bottle", "bicycle", "sheep", "dog"]


def repeated(ground_truth: GroundTruth, copies: int) -> GroundTruth:
    def samples():
        for copy in range(copies):
            for sample in ground_truth.samples():
                sample.key = f"{sample.key}-{copy}"
                yield sample
    return GroundTruth(ground_truth.class_names, samples, count=(ground_truth.count or 0) * copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gt = repeated(folder_ground_truth(str(DATA), None, str(DATA / "classes.txt"), "_image", "_target"), args.copies)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    ray.init(num_cpus=args.threads, include_dashboard=False, namespace="gemlabel", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    try:
        base = {"vocab": VOCAB, "model": args.model, "pretrained": "none", "input_size": [args.input_size],
                "batch_size": args.batch, "cpus_per_worker": float(args.threads), "num_workers": 1,
                "decode_threads": 2, "progress": False, "input": ["(set below)"]}
        shards = write_image_shards(gt, str(tmp / "shards" / "voc"))

        def label(name: str) -> float:
            config = load_config(None, {**base, "input": shards, "output": str(tmp / name)})
            start = time.perf_counter()
            run_labeling(config)
            return time.perf_counter() - start

        label_before = label("label-1")
        start = time.perf_counter()
        config = load_config(None, {**base, "output": str(tmp / "eval" / "labels")})
        output, _ = label_ground_truth(gt, config, str(tmp / "eval"))
        scoring_start = time.perf_counter()
        vocab, rows = read_output_rows(config.location(output))
        mapping = build_mapping(gt.class_names, vocab)
        result = score_rows(gt, rows, mapping, progress=False)
        eval_s, scoring_s = time.perf_counter() - start, time.perf_counter() - scoring_start
        label_after = label("label-2")
        label_s = (label_before + label_after) / 2

        spec = build_spec(config)
        segmenter = load_segmenter(spec, torch.device("cpu"))
        vocabulary = segmenter.vocabulary(spec.class_names, spec.templates)
        start = time.perf_counter()
        cached = compute_similarities(gt, segmenter, {"config": vocabulary}, mapping, (args.input_size, args.input_size),
                                      args.batch, progress=False)
        model_s = time.perf_counter() - start
        grid = Grid([25.0, 50.0, 100.0], [0.0, 0.3, 0.5], [1, 256])
        calibration = sweep(cached, mapping, grid, model_s, progress=False)
        point_s = calibration.sweep_seconds / grid.size
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    images = result.images_scored
    print(json.dumps({
        "args": vars(args), "images": images, "torch": torch.__version__,
        "label_s": round(label_s, 2), "label_runs_s": [round(label_before, 2), round(label_after, 2)],
        "eval_s": round(eval_s, 2), "eval_scoring_s": round(scoring_s, 2),
        "eval_over_label": round(eval_s / label_s, 3), "scoring_over_label": round(scoring_s / label_s, 3),
        "scoring_ms_per_image": round(1000 * scoring_s / images, 1),
        "calibrate_model_s": round(model_s, 2), "calibrate_grid_points": grid.size,
        "calibrate_sweep_s": round(calibration.sweep_seconds, 2),
        "calibrate_point_s": round(point_s, 3), "calibrate_point_ms_per_image": round(1000 * point_s / images, 1),
        "point_over_model_pass": round(point_s / model_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
