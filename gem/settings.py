"""GEM's and post-processing's settings: one definition for the library, the YAML config, the
command-line flags and the docs' key table (pydantic, so no torch is imported to validate them)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


# "gem", then the last-block heads of gem.heads.HEAD_METHODS, then ProxyCLIP (gem.proxyclip; a
# test checks they agree); here so that the config can validate a method without importing torch.
METHODS = ("gem", "naclip", "kk", "sclip", "vanilla", "proxyclip")

# ProxyCLIP's proxies (gem.vfm.VFM_ARCHS holds their architectures; a test checks they agree).
VFM_NAMES = ("dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "dinov2_vitl14_reg",
             "sam_vit_b", "sam_vit_l", "sam_vit_h")
SAM_MODELS = ("vit_b", "vit_l", "vit_h")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Triple = tuple[StrictFloat, StrictFloat, StrictFloat]
ArchValue = Union[StrictInt, StrictFloat, list[StrictInt]]


def _top_level(description: str) -> dict:
    """A library setting that the job config holds as a top-level key, not in the ``gem`` section
    (it chooses the head, of which GEM is one): excluded from the section's dump and keys."""
    return dict(exclude=True, json_schema_extra={"top_level": True}, description=description)


class _Settings(BaseModel):
    """Frozen, unknown keys refused, no silent coercion of strings to numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_dict(self) -> dict:
        """Every setting, those the job config keeps top-level (and so excludes from dumps) too."""
        return {name: getattr(self, name) for name in type(self).model_fields}


class VFMSettings(_Settings):
    """The vision foundation model whose patch features give ProxyCLIP its attention.

    weights: ``hub`` (the architecture's published weights: timm's on the Hugging Face hub for
    DINO/DINOv2, Meta's checkpoint for SAM, both cached), a local checkpoint (timm's key names or
    the original repositories'), or ``none`` (random: tests, benchmarks). arch: overrides of the
    architecture (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``img_size``...), for
    custom or tiny models; the weights must fit it."""

    name: Literal[VFM_NAMES] = Field("dino_vitb8", description="the VFM: " + ", ".join(VFM_NAMES))
    weights: Optional[StrictStr] = Field(
        "hub", description="`hub` (published weights, cached), a local checkpoint path, or `none` (random)")
    mean: Triple = Field(IMAGENET_MEAN, description="the VFM's input normalisation: per-channel mean of [0, 1] RGB")
    std: Triple = Field(IMAGENET_STD, description="the VFM's input normalisation: per-channel std")
    arch: dict[StrictStr, ArchValue] = Field(
        default_factory=dict, description="architecture overrides (embed_dim, depth, num_heads, ...); {}: the named one")


class ProxyCLIPSettings(_Settings):
    """ProxyCLIP (Lan et al., ECCV 2024): CLIP's last block attends with the VFM's feature
    similarities, ``gamma * (S - beta * mean(S))``, negatives masked. pad_multiple: sliding-window
    crops are zero-padded to multiples of it, as the reference pads to 56 (1: no padding).
    fix_nonsquare: the reference takes the VFM grid from a crop's height for both sides and
    reads CLIP's values as a transposed grid, wrong for non-square crops (DINO silently mixes
    tokens into channels, DINOv2 fails); True uses each crop's own grid (changes non-square
    crops only)."""

    vfm: VFMSettings = Field(default_factory=VFMSettings, description="the proxy model")
    beta: StrictFloat = Field(1.2, gt=0, description="adaptive normalisation: subtracts beta x the mean similarity")
    gamma: StrictFloat = Field(3.0, gt=0, description="scales the normalised similarities before the softmax")
    pad_multiple: StrictInt = Field(56, ge=1, description="sliding-window crops padded to multiples of it (1: none)")
    fix_nonsquare: StrictBool = Field(False, description="non-square crops use their own grid (the reference's "
                                                         "height-only grid is a defect); off: as the reference")


class SAMRefineSettings(_Settings):
    """Trident's SAM refinement (Shi et al., arXiv 2411.09219) of a coarse label map: each
    class's connected regions prompt SAM (box, peak point, the class's scores as a mask prompt);
    SAM's masks replace the regions whose predicted IoU passes ``iou_thresh``.

    Defaults: Trident's base config. fix_prompt_frame: the reference scales points and boxes as if
    the image were its half-resolution size, not SAM's input frame (differs when a side is not a
    multiple of 16 or is odd); batch_mask_prompt: the reference hands SAM its mask prompt
    unbatched, so SAM's LayerNorm2d normalises the prompt's rows instead of its channels. Both off:
    as the reference."""

    model: Literal[SAM_MODELS] = Field("vit_b", description="SAM's image encoder size: " + ", ".join(SAM_MODELS))
    weights: Optional[StrictStr] = Field(
        "hub", description="`hub` (Meta's checkpoint, cached), a local checkpoint path, or `none` (random)")
    arch: dict[StrictStr, ArchValue] = Field(default_factory=dict, description="architecture overrides (tests)")
    coarse_thresh: StrictFloat = Field(0.2, description="half-resolution pixels whose best score is below it join "
                                                        "no region; mask-prompt values below it are zeroed")
    minimal_area: StrictInt = Field(225, ge=0, description="regions with fewer half-resolution pixels prompt nothing")
    mask_coeff: StrictFloat = Field(0.005, description="multiplies the class scores given to SAM as its mask prompt")
    iou_thresh: StrictFloat = Field(0.8, description="SAM masks whose predicted IoU is not above it are rejected")
    image_multiple: StrictInt = Field(16, ge=1, description="the image SAM encodes has its sides rounded up to "
                                                            "multiples of it (Trident: the CLIP patch)")
    fix_prompt_frame: StrictBool = Field(False, description="scale prompts to SAM's own input frame")
    batch_mask_prompt: StrictBool = Field(False, description="give SAM the mask prompt batched, one per prompt")
    max_pixels: StrictInt = Field(
        1 << 22, ge=0, description="images with more pixels are refined at a size scaled down to about this many "
                                   "(aspect ratio kept), the refined labels then taken to the image's size "
                                   "(nearest), so memory stays bounded on large photos (SAM's masks come from "
                                   "256 x 256 logits either way); 0: always at the image's own size")


class GEMSettings(_Settings):
    """depth: GEM on the last depth-1 blocks; iters: clustering iterations; inv_temperature:
    None = adaptive per image, else a fixed multiplier of the cosine similarities.
    method: gem, or a last-block head (naclip, kk, sclip, vanilla; ``gem.heads``; proxyclip,
    ``gem.proxyclip``), which ignore the GEM keys; gaussian_std: naclip's neighbourhood, in
    patches; proxyclip: ProxyCLIP's settings (its VFM)."""

    depth: StrictInt = Field(7, gt=0, description="GEM acts on the last depth-1 blocks of the ViT")
    iters: StrictInt = Field(1, ge=0, description="self-self clustering iterations")
    inv_temperature: Optional[StrictFloat] = Field(
        None, gt=0, description="fixed multiplier of the cosine similarities; null: the paper's adaptive value")
    method: Literal[METHODS] = Field(
        "gem", **_top_level("`gem`, a NACLIP-family last-block head: `naclip`, `kk`, `sclip`, `vanilla`, or "
                            "`proxyclip` (CLIP's last block attends with a VFM's patch features: the `proxyclip` "
                            "section); all but `gem` ignore the `gem` section"))
    gaussian_std: StrictFloat = Field(
        5.0, gt=0, **_top_level("`naclip`'s Gaussian neighbourhood, in patches"))
    proxyclip: ProxyCLIPSettings = Field(
        default_factory=ProxyCLIPSettings, **_top_level("`proxyclip`'s settings: its VFM, beta, gamma, padding"))


class LabelingThresholds(_Settings):
    """logit_scale multiplies cosine similarities before the softmax over classes; a pixel whose
    top class probability is below background_threshold is background; classes covering fewer
    than min_area pixels are dropped."""

    logit_scale: StrictFloat = Field(100.0, gt=0, description="multiplies cosine similarities before the "
                                                               "softmax over classes")
    background_threshold: StrictFloat = Field(0.0, ge=0, le=1, description="pixels whose top class probability "
                                                                             "is below it are background")
    min_area: StrictInt = Field(1, ge=1, description="classes with fewer pixels are not reported")
