"""Semantic segmentation label maps, the layout mmseg (img_dir/ann_dir) and detectron2 read.

    DEST/ann_dir/<split>/<stem>.png    8-bit single-channel PNG: a class index per pixel
    DEST/img_dir/<split>/<stem>.<ext>  with --images
    DEST/classes.json, classes.txt     index -> class name, background/ignore index, palette

Classes are 0..C-1 and background (unlabelled) pixels take ``background_index`` (255 by
default: mmseg's and detectron2's ignore value). With ``background_index`` 0 the classes are
1..C instead, for trainers that learn background as a class.

The PNGs are greyscale ("L") by default: PIL, ``cv2.imread(f, IMREAD_UNCHANGED)``, mmseg and
detectron2 (``read_image(f, "L")``, i.e. PIL's ``convert("L")``) all read a grey PNG's values as
they are, whereas a palette PNG's indices become colours (cv2) or luminance (detectron2).
``palette`` writes palette PNGs for viewing; only PIL-mode-P readers (mmseg) get indices from those.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from pipeline.export.common import ShardContext, image_stem
from pipeline.store.labelset import LabelSet, label_mask
from pipeline.masks.palette import BACKGROUND_COLOR, class_color


def class_offset(options) -> int:
    return 1 if options.background_index == 0 else 0


def palette(num_classes: int, options) -> list[int]:
    colors = [BACKGROUND_COLOR] * 256
    for class_id in range(num_classes):
        colors[class_id + class_offset(options)] = class_color(class_id)
    return [channel for color in colors for channel in color]


def label_map(row: dict, options) -> np.ndarray:
    """(H, W) uint8: each label's class index where its mask is, background elsewhere."""
    values = np.full((row["height"], row["width"]), options.background_index, dtype=np.uint8)
    for label in row["labels"]:
        values[label_mask(label)] = label["class_id"] + class_offset(options)
    return values


def export_shard(ctx: ShardContext, rows: list[dict]) -> dict:
    colors = palette(len(ctx.labelset.class_names), ctx.options) if ctx.options.palette else None
    for row in rows:
        image = Image.fromarray(label_map(row, ctx.options))  # uint8 (H, W): mode "L"
        if colors is not None:
            image = image.convert("P")  # the same indices, a colour table for viewers
            image.putpalette(colors)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        ctx.out("ann_dir", ctx.split, f"{image_stem(row['sample_id'])}.png").write_bytes_atomic(buffer.getvalue())
    return {"annotations": len(rows)}


def image_folder(split: str) -> tuple[str, ...]:
    return ("img_dir", split)


def finish(labelset: LabelSet, shard_ids: list[str], options, splits: set[str] = frozenset()) -> list[str]:
    offset = class_offset(options)
    classes = {"classes": labelset.class_names, "class_index": {n: i + offset for i, n in enumerate(labelset.class_names)},
               "background_index": options.background_index,
               "palette": [list(class_color(i)) for i in range(len(labelset.class_names))]}
    files = [options.dest.child("classes.json"), options.dest.child("classes.txt")]
    files[0].write_bytes_atomic(json.dumps(classes, indent=1).encode())
    files[1].write_bytes_atomic("".join(f"{n}\n" for n in labelset.class_names).encode())
    return [file.url for file in files]
