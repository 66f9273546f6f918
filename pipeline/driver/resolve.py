"""Pin down, once in the driver, what the run's paths and files are.

Relative local paths mean the driver's working directory; Ray workers run elsewhere (an external
head's folder, another machine), so every path is made absolute before the run spec is handed
out. Under ``ray job submit`` the driver itself runs in Ray's temporary copy of the working dir,
so a relative *output* would be written there and lost: it is refused.

Files named by path (a local checkpoint, a model config) are fingerprinted by their contents,
not their names, so replacing a checkpoint in place cannot mix labels of two models.
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Optional

from gem.loading import RANDOM_WEIGHTS
from pipeline.config import ConfigError, LabelConfig
from pipeline.io.storage import Location, file_identity, protocol_of

_HASH_CHUNK = 8 << 20


def running_as_ray_job() -> bool:
    """True inside a `ray job submit` driver (the job supervisor sets its job config, and the
    driver's cwd is a copy of the working dir under Ray's runtime_resources)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or f"{os.sep}runtime_resources{os.sep}" in os.getcwd() + os.sep


def _is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def _strip_file_scheme(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def absolute(url: str) -> str:
    """Local paths absolute (without file://); URLs unchanged."""
    return os.path.abspath(_strip_file_scheme(url)) if _is_local(url) else url


def _looks_like_path(value: Optional[str]) -> bool:
    return bool(value) and (not _is_local(value) or os.path.exists(_strip_file_scheme(value)))


def resolve_paths(config: LabelConfig) -> LabelConfig:
    """A copy of the config whose local paths are absolute; ConfigError for a relative output
    under `ray job submit`."""
    if _is_local(config.output) and not os.path.isabs(_strip_file_scheme(config.output)) and running_as_ray_job():
        raise ConfigError(f"output: {config.output!r} is a relative path, and under `ray job submit` it would be "
                          "written into Ray's temporary copy of the working dir; use an absolute path or a URL "
                          "(s3://bucket/labels)")
    resolved = copy.copy(config)
    resolved.output = absolute(config.output)
    resolved.input = [absolute(pattern) for pattern in config.input]
    if config.vocab_file:
        resolved.vocab_file = absolute(config.vocab_file)
    if config.model_config:
        resolved.model_config = absolute(config.model_config)
    if config.pretrained and _is_local(config.pretrained) and os.path.exists(_strip_file_scheme(config.pretrained)):
        resolved.pretrained = absolute(config.pretrained)
    for section, weights in (("proxyclip", config.proxyclip.vfm.weights), ("sam", config.sam.weights)):
        if weights and weights != "hub" and _is_local(weights) and os.path.exists(_strip_file_scheme(weights)):
            resolved = _with_weights(resolved, section, absolute(weights))
    if isinstance(config.templates, str) and os.path.isfile(config.templates):
        resolved.templates = absolute(config.templates)
    return resolved


def _with_weights(config: LabelConfig, section: str, weights: str) -> LabelConfig:
    """The config with the VFM's (``proxyclip``) or SAM's (``sam``) weights path replaced."""
    if section == "proxyclip":
        vfm = config.proxyclip.vfm.model_copy(update={"weights": weights})
        config.proxyclip = config.proxyclip.model_copy(update={"vfm": vfm})
    else:
        config.sam = config.sam.model_copy(update={"weights": weights})
    return config


def _hash_local(path: Path) -> dict:
    digest, size = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def content_identity(source: Location) -> Optional[dict]:
    """Size + sha256 of a local file or folder, size + etag of an object; None for names that
    are not files (open_clip tags such as ``openai``)."""
    url = source.url
    if not _looks_like_path(url):
        return None
    if _is_local(url):
        return _hash_local(Path(_strip_file_scheme(url)))
    fs, path = source.fs_path
    try:
        return file_identity(fs.info(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {url}: {err}") from None


def content_fingerprints(config: LabelConfig) -> dict:
    """The fingerprint's entries for the contents of the files the config names: CLIP's checkpoint
    and model config, and with ``method: proxyclip`` / ``refine: sam`` the VFM's and SAM's weights
    (a local file by its contents, ``hub`` by the published checkpoint it stands for)."""
    named = {"pretrained_content": config.pretrained, "model_config_content": config.model_config}
    contents = {key: content_identity(config.location(url)) for key, url in named.items() if url}
    if config.method == "proxyclip":
        contents["vfm_weights_content"] = _weights_identity(config, config.proxyclip.vfm.weights,
                                                            _vfm_hub_name(config.proxyclip.vfm.name))
    if config.refine == "sam":
        contents["sam_weights_content"] = _weights_identity(config, config.sam.weights,
                                                            _sam_hub_name(config.sam.model))
    return {key: value for key, value in contents.items() if value is not None}


def _vfm_hub_name(name: str) -> str:
    from gem.vfm import VFM_ARCHS
    spec = VFM_ARCHS[name]
    return f"timm/{spec.hub}" if spec.family != "sam" else _sam_hub_name(spec.arch)


def _sam_hub_name(model: str) -> str:
    from gem.sam import SAM_CHECKPOINTS
    return os.path.basename(SAM_CHECKPOINTS[model])  # Meta's file names carry a hash of their contents


def _weights_identity(config: LabelConfig, weights: Optional[str], hub_name: str) -> Optional[dict]:
    """``hub``: the published checkpoint's name (as open_clip tags are); none: nothing (the
    section says random); a file: its size and sha256 (or an object's etag)."""
    if weights is None or weights.lower() in RANDOM_WEIGHTS:
        return None
    if weights == "hub":
        return {"hub": hub_name}
    return content_identity(config.location(weights))
