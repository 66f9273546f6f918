"""The labeling run's configuration: one pydantic schema for the YAML keys, the ``gemlabel label``
flags, the validation messages and the configuration table of docs/configuration.md.

Every key is checked (unknown keys, types, ranges) before any work starts, so a bad config is one
clear ``ConfigError`` line (``key: what is wrong``) instead of a traceback from inside a Ray actor.
"""
from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter,
                      field_validator, model_validator)
from pydantic.dataclasses import dataclass

from gem.settings import METHODS, GEMSettings, LabelingThresholds, ProxyCLIPSettings, SAMRefineSettings
from pipeline.io.storage import Location


SCHEMA_VERSION = 1


# The sections are the library's own settings classes: one definition for both.
GEMConfig = GEMSettings


ThresholdConfig = LabelingThresholds


ProxyCLIPConfig = ProxyCLIPSettings  # with its ``vfm`` sub-section (gem.settings.VFMSettings)


SAMConfig = SAMRefineSettings


REFINES = ("none", "sam")  # post-processing of the label map: none, or Trident's SAM refinement


DecodeMode = Literal["auto", "cpu", "gpu"]  # where JPEGs are decoded (pipeline/worker/device_feed.py)


class SlideConfig(BaseModel):
    """Sliding-window inference (mmseg's ``slide_inference``); no crop: the whole image at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop: Optional[StrictInt] = Field(
        None, description="sliding-window side in model-input pixels (>= 16), windows placed as mmseg's and "
                          "overlaps averaged, the crops of a batch's images sharing forwards; null: the whole "
                          "image at once")
    stride: Optional[StrictInt] = Field(None, description="step between windows, 1 to crop; null: crop // 2")

    @model_validator(mode="before")
    @classmethod
    def _half_crop_stride(cls, value: Any) -> Any:
        """The stride defaults to half the crop, so the config (and its fingerprint) says which."""
        if isinstance(value, dict) and value.get("stride") is None and isinstance(value.get("crop"), int):
            return {**value, "stride": max(1, value["crop"] // 2)}
        return value


class PAMRConfig(BaseModel):
    """Pixel-adaptive mask refinement of the class scores at the image's size (``gem.pamr``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = Field(
        False, json_schema_extra={"flag": "--pamr"},
        description="refine the full-resolution class scores against the image (PAMR) before the decision; "
                    "points come from the refined map")
    steps: StrictInt = Field(10, description="PAMR averaging iterations (>= 1)")
    dilations: list[StrictInt] = Field(default_factory=lambda: [8, 16],
                                       description="PAMR neighbourhood spacings in pixels (positive)")


def _flag(*, flag: Optional[str] = None, no_flag: Optional[str] = None, cli: Optional[str] = None,
          flag_prefix: Optional[str] = None) -> dict:
    """Command-line metadata of a key: its flag name if not derived from the key, the reason it
    has none, how the flag's text is parsed ('comma': a comma-separated list, 'vocab': classes
    split on commas and synonyms on '|', 'json'), or for a section the prefix of its flags."""
    given = {"flag": flag, "no_flag": no_flag, "cli": cli, "flag_prefix": flag_prefix}
    return {k: v for k, v in given.items() if v is not None}


@dataclass(config=ConfigDict(extra="forbid", protected_namespaces=()))
class LabelConfig:
    input: list[StrictStr] = Field(
        default_factory=list, description="shard URLs, globs (`*`), brace patterns (`{000..099}`) or `.txt` "
                                          "lists of shards, local or on any fsspec filesystem")
    output: StrictStr = Field("", description="output prefix: a local folder or an `s3://`, `gs://` URL")
    vocab: list[Union[StrictStr, list[StrictStr]]] = Field(
        default_factory=list, json_schema_extra=_flag(cli="vocab"),
        description="class names; in YAML one list item per class (`\"pepper, sweet\"` is one class), an item "
                    "that is a list holds one class's synonyms (the first is the label); the flag splits "
                    "classes on commas and synonyms on `|`: `\"person|man|woman,dog\"`")
    vocab_file: Optional[StrictStr] = Field(
        None, description="a UTF-8 file (local or URL) with one class a line, commas between its synonyms; "
                          "`#` starts a comment")
    background: list[StrictStr] = Field(
        default_factory=list, json_schema_extra=_flag(cli="comma"),
        description="background names (`sky`, `wall`): they compete with the classes but are never labels; "
                    "the flag splits on commas")
    templates: Union[StrictStr, list[StrictStr]] = Field(
        "single", description="prompt templates: `single` (`a photo of a {}.`), `imagenet80`, a file with one "
                              "a line, or templates containing `{}`")
    model: StrictStr = Field("ViT-B-16", description="open_clip model name")
    pretrained: Optional[StrictStr] = Field(
        "openai", description="open_clip weights tag, a local checkpoint path, or `none` (random weights)")
    model_config: Optional[StrictStr] = Field(
        None, description="an extra open_clip model config JSON (file or folder) for custom architectures")
    gem: GEMSettings = Field(default_factory=GEMSettings, description="GEM settings")
    thresholds: LabelingThresholds = Field(default_factory=LabelingThresholds, description="post-processing")
    method: Literal[METHODS] = Field("gem", description=GEMSettings.model_fields["method"].description)
    gaussian_std: StrictFloat = Field(5.0, gt=0, description=GEMSettings.model_fields["gaussian_std"].description)
    input_size: list[StrictInt] = Field(
        default_factory=lambda: [448, 448],
        description="model input, `SIZE` or `HEIGHT WIDTH` (>= 16, multiples of the patch size): images are "
                    "resized to it, masks, boxes and points come back at the image's own size")
    resize: Literal["square", "short_side"] = Field(
        "square", description="`square`: every image to `input_size`; `short_side`: keep the aspect ratio, "
                              "short side to `short_side`, long side at most `max_long_side`")
    short_side: StrictInt = Field(448, ge=16, description="with `resize: short_side`: the short side's length")
    max_long_side: StrictInt = Field(2048, description="with `resize: short_side`: the long side's cap "
                                                       "(>= short_side)")
    slide: SlideConfig = Field(default_factory=SlideConfig, json_schema_extra=_flag(flag_prefix="slide-"),
                               description="sliding windows")
    pamr: PAMRConfig = Field(default_factory=PAMRConfig, json_schema_extra=_flag(flag_prefix="pamr-"),
                             description="pixel-adaptive mask refinement")
    proxyclip: ProxyCLIPSettings = Field(
        default_factory=ProxyCLIPSettings, json_schema_extra=_flag(flag_prefix="proxyclip-"),
        description="ProxyCLIP's settings (with `method: proxyclip`): its VFM and attention")
    refine: Literal[REFINES] = Field(
        "none", description="`sam`: Trident's SAM refinement of the label map (any method; the `sam` section): "
                            "each class's connected regions prompt SAM, whose accepted masks replace them; "
                            "`none`: the label map as the method gives it")
    sam: SAMRefineSettings = Field(default_factory=SAMRefineSettings, json_schema_extra=_flag(flag_prefix="sam-"),
                                   description="SAM refinement's settings (with `refine: sam`)")
    points: Literal["peak", "per_component"] = Field(
        "peak", description="prompt points per label: the class's `peak`, or one per connected component "
                            "(`per_component`: the peak first, then the other components largest first, e.g. for SAM)")
    max_points: StrictInt = Field(5, ge=1, description="with `points: per_component`: at most this many a label")
    instance_scores: StrictBool = Field(
        True, json_schema_extra=_flag(flag="--no-instance-scores"),
        description="score each label's connected components by their own mean probability "
                    "(`labels[].instances`, COCO instances' scores); `false` saves its post-processing "
                    "time on large images (BENCHMARKS.md) and leaves `instances` empty")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on GPU, fp32 on CPU")
    batch_size: Optional[StrictInt] = Field(
        None, gt=0, description="images per model call; `null`: derived from the node (64 per GPU, 16 on CPU)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`auto`: GPUs if the cluster has some; `cuda`: GPU actors (also waits for an "
                            "autoscaler); `cpu`")
    num_workers: Optional[StrictInt] = Field(None, ge=1, description="Ray actors; default: one per GPU, else 1")
    gpus_per_worker: StrictFloat = Field(1.0, ge=0, description="GPUs per actor when GPUs are used")
    cpus_per_worker: Optional[StrictFloat] = Field(
        None, gt=0, description="CPUs per actor (fractions allowed); `null`: derived from the node (a GPU "
                                "worker takes the node's CPUs per GPU, CPU workers split the node)")
    decode_threads: Optional[StrictInt] = Field(
        None, gt=0, description="image-decoding threads per actor; `null`: derived from the node "
                                "(from `cpus_per_worker`)")
    postprocess_threads: Optional[StrictInt] = Field(
        None, gt=0, description="label-map and RLE threads per actor; `null`: derived from the node "
                                "(from `cpus_per_worker`)")
    shards_per_worker: StrictInt = Field(
        2, ge=1, description="shards a worker holds at once: the next one is read and decoded while the last "
                             "one's final batches are labelled and written, so the model does not wait between "
                             "shards; 1: one at a time")
    decode: DecodeMode = Field(
        "auto", description="`auto`: plain JPEGs decoded and resized on the GPU (nvJPEG) when the worker has one, "
                            "other images on the CPU; `cpu`; `gpu` (needs GPU workers)")
    jpeg_draft: StrictBool = Field(
        False, description="JPEGs decoded on the CPU at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) where that "
                           "still covers the model input: 1080p decodes in about half the CPU time; the model "
                           "input's pixels differ slightly, so the labels may too (fingerprinted). Labels stay "
                           "at the image's own size. GPU workers with `decode: auto` send plain JPEGs to "
                           "nvJPEG at full size; `decode: cpu` drafts them all")
    max_shard_retries: StrictInt = Field(2, ge=0, description="attempts after the first, per shard")
    max_actor_restarts: StrictInt = Field(8, ge=0, description="replacement actors before the run gives up")
    schedule_timeout_s: StrictFloat = Field(
        600.0, gt=0, description="with an autoscaler: seconds to wait for the workers' resources to appear")
    read_timeout_s: StrictFloat = Field(
        60.0, gt=0, description="a shard whose open or read (any storage: local, s3, gs, http) gives no data for this "
                               "long fails as stalled")
    storage_options: dict[StrictStr, dict[StrictStr, Any]] = Field(
        default_factory=dict, json_schema_extra=_flag(cli="json"),
        description="fsspec options per protocol, e.g. `{s3: {endpoint_url: http://minio:9000}}` "
                    "(or `--s3-endpoint URL`)")
    ray_address: Optional[StrictStr] = Field(
        None, description="Ray cluster address; default: `RAY_ADDRESS` (set inside `ray job submit`), "
                          "else a local Ray")
    overwrite: StrictBool = Field(False, description="redo every shard, even under other settings")
    retry_failed: StrictBool = Field(False, description="redo shards that had failed images")
    progress: StrictBool = Field(True, json_schema_extra=_flag(flag="--no-progress"),
                                 description="a progress bar (`--no-progress`: one line per shard)")

    # Keys whose values change the labels; the rest (where, how fast) do not.
    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = ("model", "pretrained", "model_config", "gem", "thresholds",
                                                   "input_size", "precision")
    # Also changing the labels, but fingerprinted only when not at their defaults, so that outputs
    # made before these keys existed keep their fingerprints.
    FINGERPRINT_KEYS_IF_SET: ClassVar[tuple[str, ...]] = ("background", "method", "gaussian_std", "resize",
                                                          "short_side", "max_long_side", "slide", "pamr",
                                                          "jpeg_draft", "refine", "instance_scores")
    # Sections that change the labels only when a key selects them (method: proxyclip, refine:
    # sam): fingerprinted, whole, exactly then.
    FINGERPRINT_SECTIONS_IF_USED: ClassVar[dict[str, tuple[str, str]]] = {"proxyclip": ("method", "proxyclip"),
                                                                         "sam": ("refine", "sam")}

    @field_validator("input", "vocab", "background", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("input_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value, value]
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return [value[0], value[0]]
        return value

    @field_validator("templates", mode="before")
    @classmethod
    def _templates(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError(f"expected a name, a file or a list of templates, got {value!r}")

    @model_validator(mode="after")
    def _consistent(self) -> "LabelConfig":
        _check_consistency(self)
        return self

    def fingerprint_source(self, class_names: list[Union[str, list[str]]], templates: list[str]) -> dict:
        settings = self.to_dict()
        source = {key: settings[key] for key in self.FINGERPRINT_KEYS}
        source.update({key: settings[key] for key in self.non_default(self.FINGERPRINT_KEYS_IF_SET)})
        source.update({section: settings[section] for section, (key, value) in
                       self.FINGERPRINT_SECTIONS_IF_USED.items() if settings[key] == value})
        source.update(vocab=class_names, templates=templates, schema_version=SCHEMA_VERSION)
        if self.points != "peak":  # only then: outputs made before these keys keep their fingerprint
            # per_component's order changed (the peak's component first): its outputs are redone,
            # never continued with points of the other order
            source.update(points=self.points, max_points=self.max_points, points_order="peak-first")
        return source

    def non_default(self, keys: typing.Iterable[str]) -> list[str]:
        """Those of these top-level keys whose values differ from their defaults."""
        settings = self.to_dict()
        return [key for key in keys if settings[key] != _dumped_default(key)]

    def to_dict(self) -> dict:
        return ADAPTER.dump_python(self)

    def location(self, url: str) -> Location:
        """A URL of this run (input, output, vocab file...) bound to its storage options."""
        return Location(url, self.storage_options)


def class_labels(vocab: typing.Sequence[Union[str, typing.Sequence[str]]]) -> list[str]:
    """Each class's label, its first name: a resolved vocabulary (or an output's) may hold lists
    of synonyms."""
    return [entry if isinstance(entry, str) else entry[0] for entry in vocab]


ADAPTER = TypeAdapter(LabelConfig)


def _dumped_default(key: str) -> Any:
    """A top-level key's default, as ``to_dict`` writes it."""
    default = LabelConfig.__pydantic_fields__[key].get_default(call_default_factory=True)
    return default.model_dump() if isinstance(default, BaseModel) else default


def _check_consistency(config: LabelConfig) -> None:
    """Rules across keys, and local files that must exist; each raises ``key: what is wrong``."""
    if not config.input:
        raise ValueError("input: give at least one shard URL, glob, brace pattern or .txt list")
    if not config.output:
        raise ValueError("output: give an output prefix (a local path or a URL such as s3://bucket/labels)")
    if config.vocab and config.vocab_file:
        raise ValueError("vocab and vocab_file: give one, not both")
    if not config.vocab and not config.vocab_file:
        raise ValueError("vocab: give class names (vocab: [cat, dog] or --vocab cat,dog) or vocab_file")
    if len(config.input_size) != 2 or min(config.input_size) < 16:
        raise ValueError(f"input_size: expected one or two sizes >= 16 (height, width), got {config.input_size}")
    if config.device == "cuda" and config.gpus_per_worker <= 0:
        raise ValueError("gpus_per_worker: must be positive with device: cuda")
    if config.decode == "gpu" and config.device == "cpu":
        raise ValueError("decode: gpu needs GPU workers; drop device: cpu or use decode: auto")
    if config.vocab_file and "://" not in config.vocab_file and not Path(config.vocab_file).is_file():
        raise ValueError(f"vocab_file: no such file {config.vocab_file}")
    if config.model_config:
        _check_model_config(config.model_config)
    _check_dense(config)


def _check_dense(config: LabelConfig) -> None:
    """The head, resize, slide and PAMR keys' rules across keys."""
    if config.gem.model_fields_set & {"method", "gaussian_std"}:
        raise ValueError("gem: method and gaussian_std are top-level keys, not in the gem section")
    if config.max_long_side < config.short_side:
        raise ValueError(f"max_long_side: must be >= short_side ({config.short_side}), got {config.max_long_side}")
    slide = config.slide
    if slide.crop is None and slide.stride is not None:
        raise ValueError("slide.stride: give slide.crop too (or neither, for whole-image inference)")
    if slide.crop is not None and (slide.crop < 16 or not 1 <= slide.stride <= slide.crop):
        raise ValueError(f"slide: need crop >= 16 and 1 <= stride <= crop, got crop {slide.crop}, "
                         f"stride {slide.stride}")
    if config.refine == "sam" and config.pamr.enabled:
        raise ValueError("pamr: PAMR is not applied with refine: sam (SAM refines the label map instead); "
                         "set pamr.enabled: false or refine: none")
    if config.refine == "sam" and config.decode == "gpu":
        raise ValueError("decode: refine: sam needs each image's pixels on the CPU (SAM's input is made while "
                         "decoding); use decode: auto or cpu")
    if config.method == "proxyclip" and config.proxyclip.vfm.weights is None:
        raise ValueError("proxyclip.vfm.weights: method proxyclip needs its VFM's weights: `hub`, a local "
                         "checkpoint path, or `none` (random)")
    if config.refine == "sam" and config.sam.weights is None:
        raise ValueError("sam.weights: refine: sam needs SAM's weights: `hub`, a local checkpoint path, or "
                         "`none` (random)")
    pamr = config.pamr
    if pamr.steps < 1 or not pamr.dilations or min(pamr.dilations) < 1:
        raise ValueError(f"pamr: need steps >= 1 and positive dilations, got steps {pamr.steps}, "
                         f"dilations {pamr.dilations}")


def _check_model_config(path: str) -> None:
    """A model config that open_clip could not parse fails here, not in every worker."""
    where = Path(path)
    if not where.exists():
        raise ValueError(f"model_config: no such file or folder {path}")
    files = sorted(where.glob("*.json")) if where.is_dir() else [where]
    if not files:
        raise ValueError(f"model_config: no .json file in the folder {path}")
    for file in files:
        try:
            parsed = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"model_config: {file} is not valid JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(parsed, dict) or "vision_cfg" not in parsed:
            raise ValueError(f"model_config: {file} is not an open_clip model config (no vision_cfg)")


def fingerprint(source: dict) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
