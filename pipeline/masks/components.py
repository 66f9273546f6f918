"""Connected components of a class mask: instances, their outlines (polygons) and prompt points.

GEM gives one region per class; detectors and SAM want instances. OpenCV does the pixel work
(8-connected components, contours with their holes, distance transform).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    through its boundary pixels' centres, its holes spliced in by zero-width bridges (as
    Ultralytics' ``merge_multi_segment`` joins segments), so a filled polygon leaves the holes
    empty instead of covering what lies in them. Each bridge runs straight up from a hole's top
    through the mask to the contour above, so ``cv2.fillPoly`` (boundary pixels included, as
    Ultralytics' ``polygon2mask`` draws) gives the mask back exactly. A contour of one or two
    pixels becomes the rectangle around them."""
    image = mask.astype(np.uint8)
    contours, hierarchy = cv2.findContours(image, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child (a hole), parent
    contours = [c.reshape(-1, 2) for c in contours]
    children = _bridges(image, contours, links)
    found = []
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole: spliced into the outline above it
        points = _simplify(_walk(contours, children, index)).astype(np.float64)
        if len(points) < 3:
            (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
            points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        found.append(points)
    return found


def _bridges(image: np.ndarray, contours: list[np.ndarray], links: np.ndarray) -> dict:
    """(contour, vertex) -> [(hole, its top vertex)]: each hole hangs from the contour pixel
    reached going straight up from its top pixel through the mask (that pixel borders the outside
    or a hole reaching higher; holes are placed top first, so none hangs from itself or a later
    one). Where no placed contour owns that pixel the hole hangs from its outline's nearest vertex."""
    owners: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index, contour in enumerate(contours):
        for vertex, (x, y) in enumerate(contour.tolist()):
            owners.setdefault((x, y), []).append((index, vertex))
    tops = {i: int(np.lexsort((c[:, 0], c[:, 1]))[0]) for i, c in enumerate(contours) if links[i][3] != -1}
    placed = {i for i in range(len(contours)) if links[i][3] == -1}
    children: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for hole in sorted(tops, key=lambda i: (contours[i][tops[i]][1], contours[i][tops[i]][0])):
        x, y = (int(v) for v in contours[hole][tops[hole]])
        above = np.flatnonzero(image[:y, x] == 0)
        hit = (x, int(above[-1]) + 1 if above.size else 0)
        target = next((owner for owner in owners.get(hit, []) if owner[0] in placed), None)
        if target is None:
            outline = contours[links[hole][3]]
            target = (int(links[hole][3]), int(np.argmin(((outline - [x, y]) ** 2).sum(axis=1))))
        children.setdefault(target, []).append((hole, tops[hole]))
        placed.add(hole)
    return children


def _walk(contours: list[np.ndarray], children: dict, first: int) -> np.ndarray:
    """An outer contour's vertices with the holes hanging from it spliced in: at a vertex, each
    hole's loop (from its top round to its top) and back to the vertex; iterative, since holes
    hang from holes."""
    out = []
    stack: list[tuple] = [("loop", first, 0, 0)]  # contour, start vertex, vertices done
    while stack:
        item = stack.pop()
        if item[0] == "point":
            out.append(item[1])
            continue
        _, index, start, done = item
        contour = contours[index]
        vertex = (start + done) % len(contour)
        if done == len(contour):  # back at the start: a hole closes its loop, the outline is done
            if index != first:
                out.append(contour[vertex])
            continue
        out.append(contour[vertex])
        stack.append(("loop", index, start, done + 1))
        for hole, top in reversed(children.get((index, vertex), [])):
            stack.append(("point", contour[vertex]))
            stack.append(("loop", hole, top, 0))
    return np.array(out)


def _simplify(points: np.ndarray) -> np.ndarray:
    """Drop the vertices inside straight runs (as CHAIN_APPROX_SIMPLE does): steps are one pixel
    (or a vertical bridge), so equal step signs mean the same line."""
    if len(points) < 3:
        return points
    incoming = np.sign(points - np.roll(points, 1, axis=0))
    outgoing = np.sign(np.roll(points, -1, axis=0) - points)
    keep = (incoming != outgoing).any(axis=1)
    return points[keep] if keep.any() else points[:1]


def rasterize(polygon_list: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Polygons (x, y pixel coordinates) -> bool (H, W) mask: the inverse of ``polygons``."""
    canvas = np.zeros(size, dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(p).astype(np.int32).reshape(-1, 1, 2) for p in polygon_list], 1)
    return canvas.astype(bool)


MAX_INSTANCES = 64  # scored components a label keeps (largest first); smaller ones score as the class


def instance_scores(labels: np.ndarray, pixel_prob: np.ndarray, class_id: int, bbox: tuple[int, int, int, int],
                    class_score: float, min_area: int = 1, limit: int = MAX_INSTANCES) -> list[dict]:
    """The class's 8-connected components of at least ``min_area`` pixels, largest first, as
    {x, y, area, score}: (x, y) the component's first pixel in raster order (so a reader finds
    its component again: ``components`` cuts the same ones), ``score`` the mean of its pixels'
    probabilities, as the class's ``score`` is over all of them. Works inside the class's box,
    so the cost follows the class's extent, not the image's."""
    x0, y0, w, h = bbox
    inside = labels[y0:y0 + h, x0:x0 + w] == class_id
    count, cc, stats, _ = cv2.connectedComponentsWithStats(inside.view(np.uint8), connectivity=8)
    if count == 2:  # one component: the class's own mean (summed at full precision on the device)
        means = np.array([0.0, class_score])
    else:
        sums = np.bincount(cc[inside], weights=pixel_prob[y0:y0 + h, x0:x0 + w][inside], minlength=count)
        means = sums / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    found = []
    for index in range(1, count):
        area, top = int(stats[index, cv2.CC_STAT_AREA]), int(stats[index, cv2.CC_STAT_TOP])
        if area >= min_area:
            column = int(np.flatnonzero(cc[top] == index)[0])
            found.append({"x": x0 + column, "y": y0 + top, "area": area, "score": float(means[index])})
    found.sort(key=lambda i: (-i["area"], i["y"], i["x"]))
    return found[:limit]


def instance_of(label: dict, component: Component) -> Optional[dict]:
    """The label's scored instance (``instance_scores``) that is this component, if it kept one."""
    for instance in label.get("instances") or ():
        if component.mask[instance["y"], instance["x"]]:
            return instance
    return None


def instance_score(label: dict, component: Component) -> float:
    """A component's score: its own mean probability where the labeller scored it; else the
    class's peak probability for the component holding the peak and its mean for the others."""
    scored = instance_of(label, component)
    if scored is not None:
        return float(scored["score"])
    holds_peak = component.mask[label["point_y"], label["point_x"]]
    return float(label["peak_score"] if holds_peak else label["score"])


POINT_MODES = ("peak", "per_component")


def prompt_points(mask: np.ndarray, peak: tuple[int, int], peak_score: float, mean_score: float,
                  mode: str = "peak", max_points: int = 1) -> list[dict]:
    """Prompt points for a class region, as {x, y, score} (e.g. for SAM).

    ``peak``: the class's peak. ``per_component``: one point per connected component, at most
    ``max_points``: the peak first, for its own component (score: the probability there), then the
    pixel deepest inside each other component, largest first (score: the class's mean probability,
    since per-pixel probabilities are not kept)."""
    peak_point = {"x": int(peak[0]), "y": int(peak[1]), "score": float(peak_score)}
    if mode == "peak":
        return [peak_point]
    if mode != "per_component":
        raise ValueError(f"points: one of {', '.join(POINT_MODES)}; got {mode!r}")
    others = [{"x": c.point[0], "y": c.point[1], "score": float(mean_score)}
              for c in components(mask) if not c.mask[peak[1], peak[0]]]
    return [peak_point, *others][:max_points]
