"""The labeling run's configuration: YAML file + command-line overrides, validated up front.

Every key is checked (unknown keys, types, ranges) before any work starts, so a bad config is one
clear ``ConfigError`` line instead of a traceback from deep inside a Ray actor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

SCHEMA_VERSION = 1
METHODS = ("gem", "naclip", "kk", "sclip", "vanilla")  # gem.segmenter.METHODS (tests check they agree)


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


@dataclass
class GEMConfig:
    depth: int = 7
    iters: int = 1
    inv_temperature: Optional[float] = None


@dataclass
class ThresholdConfig:
    logit_scale: float = 100.0
    background_threshold: float = 0.0
    min_area: int = 1


@dataclass
class SlideConfig:
    crop: Optional[int] = None     # window side in model-input pixels; null: the whole image at once
    stride: Optional[int] = None   # default crop // 2


@dataclass
class PAMRConfig:
    enabled: bool = False
    steps: int = 10
    dilations: list[int] = field(default_factory=lambda: [8, 16])


@dataclass
class LabelConfig:
    input: list[str] = field(default_factory=list)       # shard URLs / globs / braces, or .txt list files
    output: str = ""                                      # output prefix (local path or fsspec URL)
    vocab: list[Union[str, list[str]]] = field(default_factory=list)  # a list item that is a list: synonyms
    vocab_file: Optional[str] = None                      # one class a line; commas separate synonyms
    background: list[str] = field(default_factory=list)   # names that compete with classes, never labels
    templates: Union[str, list[str]] = "single"           # single | imagenet80 | file | list
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"                  # open_clip tag, local path, or none
    model_config: Optional[str] = None                    # extra open_clip model config JSON (file or dir)
    gem: GEMConfig = field(default_factory=GEMConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    input_size: list[int] = field(default_factory=lambda: [448, 448])  # model input (height, width)
    method: str = "gem"                                   # gem | naclip | kk | sclip (gem/heads.py)
    gaussian_std: float = 5.0                             # naclip's neighbourhood, in patches
    resize: str = "square"                                # square (to input_size) | short_side
    short_side: int = 448                                 # resize: short_side keeps the aspect ratio
    max_long_side: int = 2048                             # ... with the long side capped
    slide: SlideConfig = field(default_factory=SlideConfig)  # sliding windows, or whole image
    pamr: PAMRConfig = field(default_factory=PAMRConfig)  # pixel-adaptive mask refinement
    precision: str = "auto"
    batch_size: int = 16
    device: str = "auto"                                  # auto: GPUs if the cluster has some; cuda | cpu
    num_workers: Optional[int] = None                     # default: one per GPU, else 1
    gpus_per_worker: float = 1.0                          # used when the cluster has GPUs
    cpus_per_worker: float = 1.0
    decode_threads: int = 4
    max_shard_retries: int = 2                            # attempts after the first, per shard
    max_actor_restarts: int = 8                           # replacement actors before giving up
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per protocol: {s3: {...}}
    ray_address: Optional[str] = None
    overwrite: bool = False
    retry_failed: bool = False
    progress: bool = True

    # Keys whose values change the labels; the rest (where, how fast) do not.
    FINGERPRINT_KEYS = ("model", "pretrained", "model_config", "gem", "thresholds", "input_size")
    # Also changing the labels, but fingerprinted only when not at their defaults, so that outputs
    # made before these keys existed keep their fingerprints.
    FINGERPRINT_KEYS_IF_SET = ("background", "method", "gaussian_std", "resize", "short_side", "max_long_side",
                               "slide", "pamr")

    def fingerprint_source(self, class_names: list, templates: list[str]) -> dict:
        source = {key: _plain(getattr(self, key)) for key in self.FINGERPRINT_KEYS}
        defaults = LabelConfig()
        source.update({key: _plain(getattr(self, key)) for key in self.FINGERPRINT_KEYS_IF_SET
                       if _plain(getattr(self, key)) != _plain(getattr(defaults, key))})
        source.update(vocab=class_names, templates=templates, schema_version=SCHEMA_VERSION)
        return source

    def to_dict(self) -> dict:
        return _plain(self)


def fingerprint(source: dict) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Coerce YAML/CLI scalars to the field's type, or raise ConfigError naming the key."""
    origin = getattr(expected, "__origin__", None)
    args = getattr(expected, "__args__", ())
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if expected in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (expected is int and value != int(value)):
            raise ConfigError(f"{key}: expected {'an integer' if expected is int else 'a number'}, got {value!r}")
        return expected(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    values = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        expected = hints[name]
        if dataclasses.is_dataclass(expected):
            values[name] = _build(expected, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _check_type(prefix + name, value, expected)
    return cls(**values)


def _validate(config: LabelConfig) -> None:
    if not config.input:
        raise ConfigError("input: give at least one shard URL, glob, brace pattern or .txt list")
    if not config.output:
        raise ConfigError("output: give an output prefix (a local path or a URL such as s3://bucket/labels)")
    if config.vocab and config.vocab_file:
        raise ConfigError("vocab and vocab_file: give one, not both")
    if not config.vocab and not config.vocab_file:
        raise ConfigError("vocab: give class names (vocab: [cat, dog] or --vocab cat,dog) or vocab_file")
    if len(config.input_size) == 1:
        config.input_size = config.input_size * 2
    if len(config.input_size) != 2 or min(config.input_size) < 16:
        raise ConfigError(f"input_size: expected one or two sizes >= 16 (height, width), got {config.input_size}")
    positive = {"batch_size": config.batch_size, "decode_threads": config.decode_threads,
                "cpus_per_worker": config.cpus_per_worker, "gem.depth": config.gem.depth,
                "thresholds.logit_scale": config.thresholds.logit_scale, "thresholds.min_area": config.thresholds.min_area}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if config.num_workers is not None and config.num_workers < 1:
        raise ConfigError(f"num_workers: must be at least 1, got {config.num_workers}")
    for key in ("max_shard_retries", "max_actor_restarts", "gem.iters", "gpus_per_worker"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0.0 <= config.thresholds.background_threshold <= 1.0:
        raise ConfigError(f"thresholds.background_threshold: must be in [0, 1], got "
                          f"{config.thresholds.background_threshold}")
    if config.gem.inv_temperature is not None and config.gem.inv_temperature <= 0:
        raise ConfigError("gem.inv_temperature: must be positive, or null for the adaptive temperature")
    if config.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device: one of auto, cuda, cpu; got {config.device!r}")
    if config.device == "cuda" and config.gpus_per_worker <= 0:
        raise ConfigError("gpus_per_worker: must be positive with device: cuda")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: one of auto, fp32, bf16, fp16; got {config.precision!r}")
    _validate_dense(config)
    if config.vocab_file and not Path(config.vocab_file).is_file() and "://" not in config.vocab_file:
        raise ConfigError(f"vocab_file: no such file {config.vocab_file}")
    if config.model_config and not Path(config.model_config).exists():
        raise ConfigError(f"model_config: no such file or folder {config.model_config}")


def _validate_dense(config: LabelConfig) -> None:
    """method, resize, slide, pamr: the keys of the NACLIP family and of the inference layout."""
    if config.method not in METHODS:
        raise ConfigError(f"method: one of {', '.join(METHODS)}; got {config.method!r}")
    if config.gaussian_std <= 0:
        raise ConfigError(f"gaussian_std: must be positive, got {config.gaussian_std}")
    if config.resize not in ("square", "short_side"):
        raise ConfigError(f"resize: square or short_side; got {config.resize!r}")
    if config.short_side < 16 or config.max_long_side < config.short_side:
        raise ConfigError(f"short_side: must be >= 16 and at most max_long_side, got {config.short_side} "
                          f"and {config.max_long_side}")
    slide = config.slide
    if slide.crop is None and slide.stride is not None:
        raise ConfigError("slide.stride: give slide.crop too (or neither, for whole-image inference)")
    if slide.crop is not None:
        if slide.stride is None:
            slide.stride = max(1, slide.crop // 2)
        if slide.crop < 16 or not 1 <= slide.stride <= slide.crop:
            raise ConfigError(f"slide: need crop >= 16 and 1 <= stride <= crop, got crop {slide.crop}, "
                              f"stride {slide.stride}")
    if config.pamr.steps < 1 or not config.pamr.dilations or min(config.pamr.dilations) < 1:
        raise ConfigError(f"pamr: need steps >= 1 and positive dilations, got steps {config.pamr.steps}, "
                          f"dilations {config.pamr.dilations}")


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> LabelConfig:
    """Read YAML (if given), apply overrides (dotted keys allowed: 'gem.depth'), validate."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping")
        target[name] = value
    config = _build(LabelConfig, data)
    _validate(config)
    return config
