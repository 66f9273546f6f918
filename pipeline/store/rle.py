"""GEM regions -> output label records with COCO compressed RLE masks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # readers of outputs (report, show, export) need no torch
    from gem.postprocess import ClassRegion


def encode_mask(mask: np.ndarray) -> dict:
    """Bool (H, W) -> {'size': [H, W], 'counts': str}, decodable by pycocotools."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(size: list[int], counts: str) -> np.ndarray:
    return mask_utils.decode({"size": list(size), "counts": counts.encode("ascii")}).astype(bool)


def label_record(region: ClassRegion, class_names: list[str], points: Optional[list[dict]] = None,
                 instances: Optional[list[dict]] = None) -> dict:
    """``points``: prompt points ({x, y, score}); default: the peak alone. ``instances``: the
    class's scored components ({x, y, area, score}, ``instance_scores``); default: none."""
    rle = region.rle  # encoded as the region was found: no full-size mask is made here
    return {"class_id": region.class_id, "name": class_names[region.class_id], "score": region.score,
            "peak_score": region.peak_score, "area": region.area, "bbox": list(region.bbox),
            "point_x": region.point[0], "point_y": region.point[1],
            "rle_size": rle["size"], "rle_counts": rle["counts"],
            "points": points if points is not None else
            [{"x": region.point[0], "y": region.point[1], "score": region.peak_score}],
            "instances": instances or []}
