"""COCO instance-segmentation JSON, one per split, with compressed RLE masks and SA-1B points.

    DEST/annotations/<split>.json    images, categories (the vocabulary), annotations
    DEST/images/<split>/<stem>.<ext> with --images
    DEST/_parts/<shard_id>.json      one shard's images and annotations, merged into the above

Annotations: ``segmentation`` {size, counts} (COCO compressed RLE), ``area`` (mask pixels),
``bbox`` [x, y, w, h], ``score``, ``point_coords`` [[x, y], ...] (SA-1B's prompt points),
``iscrowd`` 0. With ``instances`` each connected component is one annotation.

``score`` is the class's mean probability over its mask; with ``instances``, each instance's own
mean over its pixels, as the labeller recorded it per component (the labels' ``instances``).
Components it did not score (under the labelling run's ``min_area`` when exported with a lower
one, past the 64 largest, or outputs labelled before instances were recorded) score the class's
mean, or its peak probability for the one holding the peak; within a class the annotations run
largest first, an order COCOeval's stable sort keeps among equal scores.
"""
from __future__ import annotations

import json
import math
from typing import Optional

from pipeline.masks.components import components, instance_score
from pipeline.store.rle import encode_mask
from pipeline.export.common import ShardContext, image_file
from pipeline.store.labelset import LabelSet, label_mask, label_points


def category_id(class_id: int) -> int:
    return class_id + 1  # COCO category ids start at 1; 0 is often taken for background


def json_score(value) -> Optional[float]:
    """NaN (an overflowing model) is not JSON: null."""
    value = float(value)
    return value if math.isfinite(value) else None


def annotations_for(label: dict, instances: bool, min_area: int) -> list[dict]:
    """A Parquet label -> COCO annotations (no ids yet): the class region, or its components."""
    common = {"category_id": category_id(label["class_id"]), "score": json_score(label["score"]), "iscrowd": 0}
    if not instances:
        return [{**common, "segmentation": {"size": list(label["rle_size"]), "counts": label["rle_counts"]},
                 "area": int(label["area"]), "bbox": [float(v) for v in label["bbox"]],
                 "point_coords": [list(p) for p in label_points(label)]}]
    annotations = []
    for c in components(label_mask(label), min_area):
        # the output's own points (peak, per component) where they fall in this instance
        points = [list(p) for p in label_points(label) if c.mask[p[1], p[0]]] or [list(c.point)]
        annotations.append({**common, "score": json_score(instance_score(label, c)),
                            "segmentation": encode_mask(c.mask), "area": c.area,
                            "bbox": [float(v) for v in c.bbox], "point_coords": points})
    return annotations


def export_shard(ctx: ShardContext, rows: list[dict]) -> dict:
    images, annotations = [], []
    for row in rows:
        images.append({"file_name": image_file(row["sample_id"], ctx.options), "width": row["width"],
                       "height": row["height"], "sample_id": row["sample_id"]})
        for label in row["labels"]:
            for annotation in annotations_for(label, ctx.options.instances, ctx.options.min_area):
                annotations.append({**annotation, "image_index": len(images) - 1})
    part = {"split": ctx.split, "images": images, "annotations": annotations}
    ctx.out("_parts", f"{ctx.shard_id}.json").write_bytes_atomic(json.dumps(part, allow_nan=False).encode())
    return {"annotations": len(annotations)}


def image_folder(split: str) -> tuple[str, ...]:
    return ("images", split)


def finish(labelset: LabelSet, shard_ids: list[str], options, splits: set[str] = frozenset()) -> list[str]:
    """Merge the shards' parts into one COCO JSON per split; ids run over all shards in order."""
    categories = [{"id": category_id(i), "name": name, "supercategory": "object"}
                  for i, name in enumerate(labelset.class_names)]
    by_split: dict[str, dict] = {}
    for shard_id in shard_ids:
        file = options.dest.child("_parts", f"{shard_id}.json")
        if not file.exists():
            continue
        part = json.loads(file.read_bytes())
        coco = by_split.setdefault(part["split"], {"info": {"description": f"gemlabel {labelset.root.url}",
                                                            "labels_fingerprint": labelset.fingerprint},
                                                   "images": [], "annotations": [], "categories": categories})
        first_id = len(coco["images"]) + 1
        for offset, image in enumerate(part["images"]):
            coco["images"].append({**image, "id": first_id + offset})
        for annotation in part["annotations"]:
            image_index = annotation.pop("image_index")
            coco["annotations"].append({**annotation, "id": len(coco["annotations"]) + 1,
                                        "image_id": first_id + image_index})
    written = []
    for split, coco in sorted(by_split.items()):
        file = options.dest.child("annotations", f"{split}.json")
        file.write_bytes_atomic(json.dumps(coco, allow_nan=False).encode())
        written.append(file.url)
    return written
