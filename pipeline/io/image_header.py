"""What an image file's header says before it is decoded: its size as shown, i.e. with its EXIF
orientation applied (a quarter turn swaps width and height). The labeller sizes its input with it
and eval checks ground-truth masks against it, so both mean the same size."""
from __future__ import annotations

from PIL import Image

EXIF_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def is_sideways(image: Image.Image) -> bool:
    """Its EXIF orientation turns it a quarter: shown, its width is its stored height."""
    return image.getexif().get(EXIF_ORIENTATION, 1) in _SIDEWAYS


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened (not yet decoded) image once its EXIF orientation is applied."""
    width, height = image.size
    return (height, width) if is_sideways(image) else (width, height)
