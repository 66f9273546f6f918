"""GEM's and post-processing's settings: one definition for the library, the YAML config, the
command-line flags and the docs' key table (pydantic, so no torch is imported to validate them)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


# "gem", then the last-block heads of gem.heads.HEAD_METHODS (a test checks they agree); here so
# that the config can validate a method without importing torch.
METHODS = ("gem", "naclip", "kk", "sclip", "vanilla")


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


class GEMSettings(_Settings):
    """depth: GEM on the last depth-1 blocks; iters: clustering iterations; inv_temperature:
    None = adaptive per image, else a fixed multiplier of the cosine similarities.
    method: gem, or a last-block head (naclip, kk, sclip, vanilla; ``gem.heads``), which ignore
    the GEM keys; gaussian_std: naclip's neighbourhood, in patches."""

    depth: StrictInt = Field(7, gt=0, description="GEM acts on the last depth-1 blocks of the ViT")
    iters: StrictInt = Field(1, ge=0, description="self-self clustering iterations")
    inv_temperature: Optional[StrictFloat] = Field(
        None, gt=0, description="fixed multiplier of the cosine similarities; null: the paper's adaptive value")
    method: Literal[METHODS] = Field(
        "gem", **_top_level("`gem`, or a NACLIP-family last-block head: `naclip`, `kk`, `sclip`, `vanilla` "
                            "(these ignore the `gem` section)"))
    gaussian_std: StrictFloat = Field(
        5.0, gt=0, **_top_level("`naclip`'s Gaussian neighbourhood, in patches"))


class LabelingThresholds(_Settings):
    """logit_scale multiplies cosine similarities before the softmax over classes; a pixel whose
    top class probability is below background_threshold is background; classes covering fewer
    than min_area pixels are dropped."""

    logit_scale: StrictFloat = Field(100.0, gt=0, description="multiplies cosine similarities before the "
                                                               "softmax over classes")
    background_threshold: StrictFloat = Field(0.0, ge=0, le=1, description="pixels whose top class probability "
                                                                             "is below it are background")
    min_area: StrictInt = Field(1, ge=1, description="classes with fewer pixels are not reported")
