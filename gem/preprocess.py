"""Image preprocessing: PIL image -> normalised tensor at the model's working size."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F) -> 8-bit RGB; alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0.0
        scale = 255.0 / high if high > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def resized_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Any PIL image -> (3, height, width) uint8 at size=(height, width) (bicubic). A GPU worker
    copies these bytes to the GPU and normalises there (``normalize``): a quarter of the bytes of
    the float input, and no float work on the CPU."""
    resized = to_rgb(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """(3, H, W) uint8 -> float32 (pixels / 255 - mean) / std, on the pixels' device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t


def image_to_tensor(image: Image.Image, size: tuple[int, int], mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """Resize (bicubic) an RGB image to size=(height, width) and normalise: (3, height, width)."""
    return normalize(resized_pixels(image, size), mean, std)
