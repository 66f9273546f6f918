"""The job config's method and inference keys -> the library's settings (one place)."""
from __future__ import annotations

from typing import Optional

from gem.pamr import PAMRSettings
from gem.segmenter import InferenceSettings
from gem.settings import GEMSettings
from gem.windows import ResizeSettings, SlideWindows
from pipeline.config import LabelConfig
from pipeline.config.sizing import CPU_BATCH


def segmenter_settings(config: LabelConfig, max_batch: Optional[int] = None) -> tuple[GEMSettings, InferenceSettings]:
    """(head settings, inference settings); at most ``max_batch`` images or crops per forward:
    workers pass their batch size (``batch_size`` may be null, derived from the node); without it,
    the config's, else the CPU default.
    The config's ``gem`` section holds GEM's keys; the head's are top-level keys."""
    gem = config.gem.model_copy(update=dict(method=config.method, gaussian_std=config.gaussian_std,
                                            proxyclip=config.proxyclip))
    resize = ResizeSettings(config.resize, tuple(config.input_size), config.short_side, config.max_long_side)
    slide = SlideWindows(config.slide.crop, config.slide.stride) if config.slide.crop is not None else None
    pamr = PAMRSettings(config.pamr.steps, tuple(config.pamr.dilations)) if config.pamr.enabled else None
    return gem, InferenceSettings(resize, slide, pamr, max_batch=max_batch or config.batch_size or CPU_BATCH)
