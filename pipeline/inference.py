"""The job config's method and inference keys -> the library's settings (one place)."""
from __future__ import annotations

from gem.pamr import PAMRSettings
from gem.segmenter import GEMSettings, InferenceSettings
from gem.windows import ResizeSettings, SlideWindows
from pipeline.config import LabelConfig


def segmenter_settings(config: LabelConfig) -> tuple[GEMSettings, InferenceSettings]:
    """(head settings, inference settings); at most ``batch_size`` images or crops per forward."""
    gem = GEMSettings(config.gem.depth, config.gem.iters, config.gem.inv_temperature, config.method,
                      config.gaussian_std)
    resize = ResizeSettings(config.resize, tuple(config.input_size), config.short_side, config.max_long_side)
    slide = SlideWindows(config.slide.crop, config.slide.stride) if config.slide.crop is not None else None
    pamr = PAMRSettings(config.pamr.steps, tuple(config.pamr.dilations)) if config.pamr.enabled else None
    return gem, InferenceSettings(resize, slide, pamr, max_batch=config.batch_size)
