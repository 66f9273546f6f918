"""Pick samples from an output and draw their labels over the images.

Drawing is Pillow's: each class's mask is the image blended with the class colour at ``alpha``
(``Image.composite`` of ``Image.blend``), then the prompt points, the class names, optionally the
boxes, and a legend strip below the image (so image pixels keep their coordinates).
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from PIL import Image, ImageDraw, ImageFont

from pipeline.store.labelset import (InputChangedError, LabelSet, fetch_images, label_mask, label_points,
                                     sample_uid)
from pipeline.masks.palette import class_color

PICKS = ("random", "class", "lowest", "highest", "errors")


@dataclass
class Pick:
    row: dict
    reason: str          # which pick chose it
    score: Optional[float]


def image_score(row: dict, class_name: Optional[str] = None) -> Optional[float]:
    """The class's score, or the labels' scores averaged over their pixels; None without labels,
    or with a NaN score (an overflowing model), which no ranking can place."""
    labels = [l for l in row["labels"] if class_name is None or l["name"] == class_name]
    area = sum(l["area"] for l in labels)
    score = sum(l["score"] * l["area"] for l in labels) / area if area else None
    return score if score is not None and math.isfinite(score) else None


def pick_samples(rows: Iterable[dict], picks: list[str], count: int, seed: int = 0,
                 class_name: Optional[str] = None) -> list[Pick]:
    """Up to ``count`` samples per pick; a sample chosen by an earlier pick is not repeated."""
    rows = list(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    with_class = [r for r in ok if class_name is None or any(l["name"] == class_name for l in r["labels"])]
    scored = sorted((r for r in with_class if image_score(r, class_name) is not None),
                    key=lambda r: (image_score(r, class_name), r["sample_id"]))
    rng = random.Random(seed)
    chosen: dict[str, Pick] = {}
    for pick in picks:
        if pick == "random":
            pool = with_class
            candidates = rng.sample(pool, len(pool))
        elif pick == "class":
            candidates = rng.sample(with_class, len(with_class))
        elif pick == "lowest":
            candidates = scored
        elif pick == "highest":
            candidates = scored[::-1]
        elif pick == "errors":
            candidates = [r for r in rows if r["status"] == "error"]
        else:
            raise ValueError(f"pick: one of {', '.join(PICKS)}; got {pick!r}")
        taken = 0
        for row in candidates:
            if taken == count:
                break
            if row["sample_id"] not in chosen:
                chosen[row["sample_id"]] = Pick(row, pick, image_score(row, class_name))
                taken += 1
    return list(chosen.values())


def fetch_picked_images(picks: list[Pick], labelset: LabelSet,
                        problems: Optional[dict[str, str]] = None) -> dict[str, Image.Image]:
    """sample_id -> image, reading each shard once. An input shard that is gone, changed since it
    was labelled or unreadable is noted in ``problems`` (shard URL -> why) and its picks become
    error rows saying why, so the gallery still shows the others."""
    by_shard: dict[str, dict[str, str]] = defaultdict(dict)
    shard_ids: dict[str, str] = {}
    for pick in picks:
        if pick.row["status"] == "ok":
            by_shard[pick.row["shard"]][sample_uid(pick.row)] = pick.row["sample_id"]
            shard_ids[pick.row["shard"]] = pick.row["sample_id"].split("/", 1)[0]
    images = {}
    for shard_url, uids in by_shard.items():
        found = {}
        try:
            for uid, image in fetch_images(labelset.input_shard(shard_ids[shard_url]), uids):
                row = next(p.row for p in picks if p.row["sample_id"] == uids[uid])
                if image.size != (row["width"], row["height"]):  # changed, its identity not recorded
                    raise InputChangedError(f"{shard_url}: image {uid} is {image.width}x{image.height} but was "
                                            f"labelled at {row['width']}x{row['height']}; relabel the shard")
                found[uids[uid]] = image
        except Exception as err:  # this shard's pictures only: gone, replaced, truncated, unreachable
            message = str(err) if isinstance(err, InputChangedError) else f"{shard_url}: {type(err).__name__}: {err}"
            (problems if problems is not None else {})[shard_url] = message.strip().splitlines()[0]
            for pick in picks:
                if pick.row["shard"] == shard_url and pick.row["status"] == "ok":
                    pick.row = {**pick.row, "status": "error", "error": f"not shown: {message}"}
            continue
        images.update(found)
    return images


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_overlay(image: Image.Image, labels: list[dict], alpha: float = 0.5, boxes: bool = False) -> Image.Image:
    """The image with each label's mask tinted in its class colour, points, names, legend."""
    picture = image.convert("RGB")
    for label in labels:
        color = class_color(label["class_id"])
        tinted = Image.blend(picture, Image.new("RGB", picture.size, color), alpha)
        picture = Image.composite(tinted, picture, Image.fromarray(label_mask(label)).convert("L"))
    draw = ImageDraw.Draw(picture)
    size = max(10, min(picture.size) // 25)
    font = _font(size)
    radius = max(3, size // 3)
    for label in labels:
        color = class_color(label["class_id"])
        if boxes:
            x, y, w, h = label["bbox"]
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=color, width=max(1, size // 8))
        for x, y in label_points(label):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline="white", width=1)
        x, y = label_points(label)[0]
        draw.text((x + radius + 2, y - size // 2), label["name"], fill="white", font=font,
                  stroke_width=max(1, size // 10), stroke_fill="black")
    return _with_legend(picture, labels, font, size)


def _with_legend(picture: Image.Image, labels: list[dict], font, size: int) -> Image.Image:
    """A strip under the image: a colour swatch, name and score per class present."""
    entries = [(class_color(l["class_id"]), f"{l['name']} {l['score']:.2f}") for l in labels] or [((0, 0, 0), "no labels")]
    line = size + 6
    canvas = Image.new("RGB", (picture.width, picture.height + line * len(entries) + 4), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (color, text) in enumerate(entries):
        top = picture.height + 2 + i * line
        draw.rectangle((4, top + 2, 4 + size, top + 2 + size), fill=color, outline="black")
        draw.text((10 + size, top + 1), text, fill="black", font=font)
    return canvas
