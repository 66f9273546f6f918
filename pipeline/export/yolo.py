"""Ultralytics YOLO segmentation: one polygon per instance (connected component).

    DEST/images/<split>/<stem>.<ext>   with --images
    DEST/labels/<split>/<stem>.txt     one line per instance: class x1 y1 x2 y2 ... (0..1)
    DEST/data.yaml                     path, train/val folders, class names

A vertex is a boundary pixel in the image's 0..1 frame at ((x + 0.25) / W, (y + 0.25) / H): a
quarter pixel up-left of its centre, so that both the truncation to pixel indices of Ultralytics'
``polygon2mask`` and the rounding of supervision's ``from_yolo`` land on that pixel (with room
for float error), and their fill (boundary pixels included) draws the mask back pixel for pixel.
Polygons through pixel corners would grow each mask by a column and a row (mean IoU 0.961 on the
VOC val masks; these give 1.0). Holes are bridged into their outline (``polygons``), so they stay
empty rather than covering another class.
"""
from __future__ import annotations

import yaml

from pipeline.masks.components import components, polygons
from pipeline.export.common import ShardContext, image_stem
from pipeline.store.labelset import LabelSet, label_mask
from pipeline.io.storage import normalize_url


VERTEX_OFFSET = 0.25  # in pixels: truncated or rounded, a vertex lands on its own pixel


def label_lines(row: dict, min_area: int) -> list[str]:
    lines = []
    width, height = row["width"], row["height"]
    for label in row["labels"]:
        for component in components(label_mask(label), min_area):
            for polygon in polygons(component.mask):
                coords = " ".join(f"{(x + VERTEX_OFFSET) / width:.6f} {(y + VERTEX_OFFSET) / height:.6f}"
                                  for x, y in polygon)
                lines.append(f"{label['class_id']} {coords}")
    return lines


def export_shard(ctx: ShardContext, rows: list[dict]) -> dict:
    count = 0
    for row in rows:
        lines = label_lines(row, ctx.options.min_area)
        count += len(lines)
        file = ctx.out("labels", ctx.split, f"{image_stem(row['sample_id'])}.txt")
        file.write_bytes_atomic("".join(f"{line}\n" for line in lines).encode())
    return {"annotations": count}


def image_folder(split: str) -> tuple[str, ...]:
    return ("images", split)


def finish(labelset: LabelSet, shard_ids: list[str], options, splits: set[str] = frozenset()) -> list[str]:
    """data.yaml: train is the split named train (else the first), val the split named val (else
    another split); one split is never both: with a single split there is no val entry."""
    names = sorted(splits) or ["train"]
    train = "train" if "train" in names else names[0]
    others = [name for name in names if name != train]
    data = {"path": normalize_url(options.dest.url), "train": f"images/{train}"}
    if others:
        data["val"] = f"images/{'val' if 'val' in others else others[0]}"
    if "test" in others and data["val"] != "images/test":
        data["test"] = "images/test"
    data["names"] = dict(enumerate(labelset.class_names))
    file = options.dest.child("data.yaml")
    file.write_bytes_atomic(yaml.safe_dump(data, sort_keys=False).encode())
    return [file.url]
