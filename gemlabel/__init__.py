"""gemlabel: distributed batch pseudo-labelling with GEM and its successors.

The Python entry point. Names are imported on first use (PEP 562), so ``import gemlabel`` imports
no torch, open_clip or Ray; each name below lives in one of the packages the distribution also
installs (``gem``: the models; ``pipeline``: the data plane), whose module it names::

    from gemlabel import GEMSegmenter, GEMSettings          # the model, as a library
    from gemlabel import load_config, run_labeling         # a labelling run, from Python
    labels = gemlabel.open_output("demo/labels")           # read an output back
    for sample in labels.samples(classes=["dog"], min_score=0.5):
        sample.image, sample.to_detections()               # PIL image, supervision.Detections
    gemlabel.to_hf_dataset("demo/labels")                  # a datasets.Dataset with an Image column
    gemlabel.LabelStream("demo/labels", "detection")       # a torch IterableDataset: image, target
    gemlabel.to_fiftyone("demo/labels", "demo/fiftyone")   # a FiftyOne dataset (images written there)
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    # the models
    "GEMSegmenter": "gem.segmenter", "InferenceSettings": "gem.segmenter", "GEMSettings": "gem.settings",
    "LabelingThresholds": "gem.settings", "PAMRSettings": "gem.pamr", "ResizeSettings": "gem.windows",
    "SlideWindows": "gem.windows", "Vocabulary": "gem.vocabulary", "WeightsUnavailableError": "gem.loading",
    # a labelling run
    "LabelConfig": "pipeline.config", "ConfigError": "pipeline.config", "load_config": "pipeline.config",
    "run_labeling": "pipeline.driver.run", "RunSummary": "pipeline.driver.records",
    # reading an output
    "LabelSet": "pipeline.store.labelset", "NotAnOutputError": "pipeline.store.labelset",
    "open_output": "pipeline.store.labelset", "Sample": "pipeline.store.labelset",
    # the labels in other tools
    "to_hf_dataset": "pipeline.export.hf", "LabelStream": "pipeline.export.torch_data",
    "collate_detection": "pipeline.export.torch_data", "to_fiftyone": "pipeline.export.fiftyone_samples",
    "fiftyone_samples": "pipeline.export.fiftyone_samples",
}
__all__ = sorted([*_WHERE, "__version__"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gemlabel")
    except PackageNotFoundError:
        return "unknown (not installed)"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        raise AttributeError(f"module 'gemlabel' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
