"""GEM's and post-processing's settings: one definition for the library, the YAML config, the
command-line flags and the README's table (pydantic, so no torch is imported to validate them)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class _Settings(BaseModel):
    """Frozen, unknown keys refused, no silent coercion of strings to numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_dict(self) -> dict:
        return self.model_dump()


class GEMSettings(_Settings):
    """depth: GEM on the last depth-1 blocks; iters: clustering iterations; inv_temperature:
    None = adaptive per image, else a fixed multiplier of the cosine similarities."""

    depth: StrictInt = Field(7, gt=0, description="GEM acts on the last depth-1 blocks of the ViT")
    iters: StrictInt = Field(1, ge=0, description="self-self clustering iterations")
    inv_temperature: Optional[StrictFloat] = Field(
        None, gt=0, description="fixed multiplier of the cosine similarities; null: the paper's adaptive value")


class LabelingThresholds(_Settings):
    """logit_scale multiplies cosine similarities before the softmax over classes; a pixel whose
    top class probability is below background_threshold is background; classes covering fewer
    than min_area pixels are dropped."""

    logit_scale: StrictFloat = Field(100.0, gt=0, description="multiplies cosine similarities before the "
                                                               "softmax over classes")
    background_threshold: StrictFloat = Field(0.0, ge=0, le=1, description="pixels whose top class probability "
                                                                             "is below it are background")
    min_area: StrictInt = Field(1, ge=1, description="classes with fewer pixels are not reported")
