"""GEM (Grounding Everything Module) over open_clip ViTs: training-free open-vocabulary segmentation."""
from gem.postprocess import ClassRegion, LabelingThresholds, label_image
from gem.segmenter import GEMSegmenter, GEMSettings, InferenceSettings
from gem.pamr import PAMRSettings
from gem.windows import ResizeSettings, SlideWindows
from gem.vision import GEMTokens, GEMVisionTower, UnsupportedModelError
from gem.loading import WeightsUnavailableError, load_clip
from gem.vocabulary import Vocabulary

__all__ = ["ClassRegion", "GEMSegmenter", "GEMSettings", "GEMTokens", "GEMVisionTower", "InferenceSettings",
           "LabelingThresholds", "PAMRSettings", "ResizeSettings", "SlideWindows",
           "UnsupportedModelError", "Vocabulary", "WeightsUnavailableError", "label_image", "load_clip"]
