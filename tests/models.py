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
PROXYCLIP_REFERENCE = DATA / "proxyclip-reference"
SAM_REFERENCE = DATA / "sam-refine-reference"
# The ProxyCLIP fixture's VFMs: the hub recipes with these sizes (tests/data/proxyclip-reference).
PROXYCLIP_VFM_ARCH = {"embed_dim": 96, "depth": 3, "num_heads": 3}
PROXYCLIP_VFMS = {"dino": "dino_vitb8", "dinov2": "dinov2_vitb14_reg"}

TINY_CONFIGS = {
    # The reference fixture's model: 8 blocks, width 128, 4 heads, patch 16.
    "gemref-tiny": json.loads((REFERENCE / "open_clip_config.json").read_text()),
    # A smaller one for pipeline tests (4 blocks, width 64); Ray workers load it by file.
    "gemtest-micro": json.loads((MICRO_CONFIG).read_text()),
    # The ProxyCLIP fixture's CLIP: 4 blocks, width 128, 4 heads, patch 16, QuickGELU.
    "proxyclipref-tiny": json.loads((PROXYCLIP_REFERENCE / "open_clip_config.json").read_text()),
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


def sam_reference_arch() -> dict:
    """The SAM refinement fixture's widths, as ``gem.sam.build_sam`` overrides (its meta.json)."""
    build = json.loads((SAM_REFERENCE / "meta.json").read_text())["sam_build"]
    keys = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "encoder_global_attn_indexes",
            "prompt_embed_dim", "decoder_depth", "decoder_mlp_dim", "decoder_num_heads", "iou_head_depth",
            "iou_head_hidden_dim", "mask_in_chans", "window_size", "num_multimask_outputs")
    return {key: build[key] for key in keys}
