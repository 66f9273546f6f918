"""Import torchvision even where its compiled ops do not match the installed torch.

PyPI's torchvision wheel can sit beside a torch build whose ABI it does not match
(for example the CPU build of torch this project pins). Its C extension then fails to
load silently, and the Python side dies at import time registering fake kernels for
``torchvision::nms``. open_clip imports torchvision only for its transforms, which need
none of the compiled ops, so declaring the two missing operator schemas is enough.
"""
from __future__ import annotations

import sys

import torch

_MISSING_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Return the torchvision module, declaring its missing op schemas if needed."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    _forget_partial_import()
    for op, schema in _MISSING_OPS.items():
        try:
            torch.library.define(f"torchvision::{op}", schema)
        except RuntimeError:  # already declared by an earlier attempt
            pass
    import torchvision
    return torchvision
