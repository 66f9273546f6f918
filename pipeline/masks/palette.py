"""One colour per class, the same in every picture and label map gemlabel draws."""
from __future__ import annotations

import colorsys

BACKGROUND_COLOR = (0, 0, 0)


def class_color(class_id: int) -> tuple[int, int, int]:
    """Well separated, saturated RGB colours: hues stepped by the golden ratio."""
    hue = (0.07 + class_id * 0.618033988749895) % 1.0
    value = 0.95 if class_id % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def hex_color(class_id: int) -> str:
    return "#%02x%02x%02x" % class_color(class_id)
