"""Small random-weight open_clip models for tests and benchmarks (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gem.torchvision_shim import import_torchvision

import_torchvision()
import open_clip  # noqa: E402
from open_clip.factory import _MODEL_CONFIGS  # noqa: E402

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "gem-reference"
MICRO_CONFIG = DATA / "models" / "gemtest-micro.json"

TINY_CONFIGS = {
    # The reference fixture's model: 8 blocks, width 128, 4 heads, patch 16.
    "gemref-tiny": json.loads((REFERENCE / "open_clip_config.json").read_text()),
    # A smaller one for pipeline tests (4 blocks, width 64); Ray workers load it by file.
    "gemtest-micro": json.loads((MICRO_CONFIG).read_text()),
}


def register_test_models() -> None:
    """Make the tiny configs known to open_clip under their names (idempotent)."""
    for name, config in TINY_CONFIGS.items():
        _MODEL_CONFIGS.setdefault(name, config)


def reference_state_dict() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in torch.load(REFERENCE / "weights.pt").items()}


def save_micro_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random gemtest-micro weights saved as a local checkpoint, as users pass real ones."""
    register_test_models()
    torch.manual_seed(seed)
    model = open_clip.create_model("gemtest-micro")
    torch.save(model.state_dict(), path)
    return path
