"""Connected components of a class mask: instances, their outlines (polygons) and prompt points.

GEM gives one region per class; detectors and SAM want instances. OpenCV does the pixel work
(8-connected components, contours with their holes, distance transform).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Component:
    mask: np.ndarray                  # bool (H, W)
    area: int
    bbox: tuple[int, int, int, int]   # x, y, width, height
    point: tuple[int, int]            # (x, y): the pixel deepest inside the component


def components(mask: np.ndarray, min_area: int = 1) -> list[Component]:
    """8-connected components of at least ``min_area`` pixels, largest first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    found = []
    for index in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[index])
        if area < min_area:
            continue
        component = labels == index
        found.append(Component(component, area, (x, y, w, h), interior_point(component)))
    found.sort(key=lambda c: (-c.area, c.bbox[1], c.bbox[0]))
    return found


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel farthest from the mask's border (a prompt point inside even a ring-shaped mask)."""
    distance = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines of a mask as (N >= 3, 2) float arrays of (x, y) pixel indices: each outer contour
    through its boundary pixels' centres, with its holes spliced in by a zero-width bridge (as
    Ultralytics' ``merge_multi_segment`` joins segments), so a filled polygon leaves the holes
    empty instead of covering what lies in them. ``cv2.fillPoly`` (boundary pixels included, as
    Ultralytics' ``polygon2mask`` draws) gives the mask back. A contour of one or two pixels
    becomes the rectangle around them."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child (a hole), parent
    found = []
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole: spliced into its outer contour
        points = contour.reshape(-1, 2).astype(np.float64)
        hole = links[index][2]
        while hole != -1:
            points = _bridge(points, contours[hole].reshape(-1, 2).astype(np.float64))
            hole = links[hole][0]
        if len(points) < 3:
            (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
            points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        found.append(points)
    return found


def _bridge(outline: np.ndarray, hole: np.ndarray, candidates: int = 64) -> np.ndarray:
    """The outline with the hole spliced in: out along a bridge between their nearest vertices
    (among up to ``candidates`` of the hole's, so the cost stays linear in the outline), around
    the hole (traced the other way round by OpenCV), back along the same bridge."""
    sample = np.arange(0, len(hole), max(1, len(hole) // candidates))
    distance = ((outline[:, None, :] - hole[None, sample, :]) ** 2).sum(axis=-1)
    at, to = np.unravel_index(int(np.argmin(distance)), distance.shape)
    start = int(sample[to])
    loop = np.concatenate((np.roll(hole, -start, axis=0), hole[start:start + 1]))
    return np.concatenate((outline[:at + 1], loop, outline[at:at + 1], outline[at + 1:]))


def rasterize(polygon_list: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Polygons (x, y pixel coordinates) -> bool (H, W) mask: the inverse of ``polygons``."""
    canvas = np.zeros(size, dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(p).astype(np.int32).reshape(-1, 1, 2) for p in polygon_list], 1)
    return canvas.astype(bool)


POINT_MODES = ("peak", "per_component")


def prompt_points(mask: np.ndarray, peak: tuple[int, int], peak_score: float, mean_score: float,
                  mode: str = "peak", max_points: int = 1) -> list[dict]:
    """Prompt points for a class region, as {x, y, score} (e.g. for SAM).

    ``peak``: the class's peak. ``per_component``: one point per connected component, largest
    first, at most ``max_points``: the peak for its own component (score: the probability there),
    the pixel deepest inside each other one (score: the class's mean probability, since
    per-pixel probabilities are not kept)."""
    peak_point = {"x": int(peak[0]), "y": int(peak[1]), "score": float(peak_score)}
    if mode == "peak":
        return [peak_point]
    if mode != "per_component":
        raise ValueError(f"points: one of {', '.join(POINT_MODES)}; got {mode!r}")
    points = []
    for component in components(mask)[:max_points]:
        if component.mask[peak[1], peak[0]]:
            points.append(peak_point)
        else:
            points.append({"x": component.point[0], "y": component.point[1], "score": float(mean_score)})
    return points
