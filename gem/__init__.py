"""GEM (Grounding Everything Module) over open_clip ViTs: training-free open-vocabulary segmentation.

Names are imported on first use (PEP 562), so ``from gem.settings import GEMSettings`` and the
command's config checks do not import torch and open_clip.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ClassRegion": "gem.postprocess", "label_image": "gem.postprocess",
    "GEMSegmenter": "gem.segmenter", "InferenceSettings": "gem.segmenter",
    "GEMSettings": "gem.settings", "LabelingThresholds": "gem.settings", "PAMRSettings": "gem.pamr",
    "ResizeSettings": "gem.windows", "SlideWindows": "gem.windows",
    "GEMTokens": "gem.vision", "GEMVisionTower": "gem.vision", "UnsupportedModelError": "gem.vision",
    "WeightsUnavailableError": "gem.loading", "load_clip": "gem.loading", "Vocabulary": "gem.vocabulary",
    "ProxyCLIPSettings": "gem.settings", "VFMSettings": "gem.settings", "SAMRefineSettings": "gem.settings",
    "ProxyCLIPTower": "gem.proxyclip", "VFMFeatures": "gem.vfm", "load_vfm": "gem.vfm",
    "SAMRefiner": "gem.sam_refine", "RefinedLabels": "gem.sam_refine", "load_sam": "gem.sam",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
