"""Create an open_clip CLIP from a model name and weights (tag, local file, or none).

Weights come from an open_clip pretrained tag (downloaded to the hub cache), a local
checkpoint path, or ``None`` for random weights (tests, benchmarks). Without network access a
tag that is not cached fails at once, with a message that names the file to download and says
to pass a local path, instead of hanging in download retries. Messages name the ``pretrained``
argument (the config key), never a command-line flag: the command adds its flags' hint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

import torch

from gem.preprocess import OPENAI_MEAN, OPENAI_STD

from gem.torchvision_shim import import_torchvision

import_torchvision()
import open_clip  # noqa: E402  (needs the shim first)

from gem.vision import SUPPORTED_MODELS_HINT, UnsupportedModelError, check_supported  # noqa: E402

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = ("", "none", "random")


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be obtained (offline, unknown tag, missing file)."""


@dataclass
class LoadedCLIP:
    model: torch.nn.Module
    tokenizer: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _check_config(model_name: str) -> None:
    """Reject non-ViT towers from the config alone, before any weights are fetched."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    config = open_clip.get_model_config(model_name)
    if config is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith("ViT-"))
        raise ValueError(f"unknown open_clip model {model_name!r}; ViT models open_clip knows: {known}")
    vision = config.get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)) \
            or vision.get("attentional_pool") or "hf_model_name" in vision:
        raise UnsupportedModelError(f"{SUPPORTED_MODELS_HINT}; {model_name!r} has another image tower.")


def _hf_host() -> Optional[str]:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname


def _weights_host(model_name: str, tag: str) -> Optional[str]:
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    return _hf_host() if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether https://host answers, through the proxy settings (HTTPS_PROXY, NO_PROXY) the
    downloads themselves use; any HTTP status counts as an answer."""
    request = urllib.request.Request(f"https://{host}/", method="HEAD")
    try:
        # a fresh opener reads the proxy settings now (urlopen's global one keeps its first ones)
        urllib.request.build_opener().open(request, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, refused proxies
        return False


def vision_config(model_name: str) -> dict:
    """The model's vision tower config (layers, patch_size, ...) without building the model;
    empty for hub / local-dir models whose config is not known yet."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return {}
    return dict((open_clip.get_model_config(model_name) or {}).get("vision_cfg", {}))


def check_checkpoint_file(pretrained: Optional[str]) -> None:
    """A local checkpoint that cannot be a whole one (a truncated zip or safetensors file) is
    refused in the driver instead of failing in every worker. Reads only the file's index."""
    if not pretrained or not os.path.isfile(pretrained):
        return
    size = os.path.getsize(pretrained)
    with open(pretrained, "rb") as handle:
        head = handle.read(8)
    problem = None
    if pretrained.endswith(".safetensors"):
        header = int.from_bytes(head, "little") if len(head) == 8 else size
        problem = None if 8 + header <= size else "its header runs past the end of the file"
    elif head.startswith(b"PK"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(pretrained) as archive:
                end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
            problem = None if end <= size else "its entries run past the end of the file"
        except (zipfile.BadZipFile, OSError) as err:
            problem = str(err)
    elif size == 0:
        problem = "the file is empty"
    if problem:
        raise WeightsUnavailableError(f"pretrained {pretrained} is not a readable checkpoint ({problem}); "
                                      "it may be truncated: copy it again")
    if not pretrained.endswith(".safetensors"):
        problem = _unloadable(pretrained, zipped=head.startswith(b"PK"))
    if problem:
        raise WeightsUnavailableError(f"--pretrained {pretrained} is not a checkpoint the workers can load ({problem})")


def head_is_pickle(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"  # a pickle's PROTO opcode: torch.save's legacy format


def _unloadable(pretrained: str, zipped: bool) -> Optional[str]:
    """Why torch cannot load the checkpoint as the workers will (``weights_only``: tensors and
    plain containers, never arbitrary pickled objects), or None. A zip file is memory-mapped, so
    only its index and pickle are read here, not its tensors."""
    import torch
    if not zipped and not head_is_pickle(pretrained):
        return "it is neither a torch.save file nor a .safetensors file"
    try:
        try:
            torch.load(pretrained, map_location="cpu", weights_only=True, mmap=zipped)
        except RuntimeError as err:  # a zip torch cannot map (a TorchScript archive): load it as the workers do
            if not zipped or "mmap" not in str(err):
                raise
            torch.load(pretrained, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        text = str(err).strip()
        if "Weights only load failed" in text:
            return "it holds pickled objects other than tensors, which are not loaded (they could run code)"
        return (text.splitlines() or [type(err).__name__])[0]
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool = True) -> Iterator[None]:
    """While active, huggingface_hub serves from its cache only (it reads this flag at call time)."""
    from huggingface_hub import constants
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _download_source(model_name: str, tag: Optional[str]) -> str:
    """Where the weights come from, for a user to fetch them by hand: file name and hub repo (or URL)."""
    if model_name.startswith("hf-hub:"):
        return f"the files of Hugging Face hub repo {model_name[len('hf-hub:'):]}"
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" (default file) or "org/model/file.pt"
        filename = filename or "open_clip_pytorch_model.bin"
        return f"{filename} from Hugging Face hub repo {repo} (https://huggingface.co/{repo})"
    if cfg.get("url"):
        return f"{cfg['url'].rsplit('/', 1)[-1]} from {cfg['url']}"
    return f"the {tag} checkpoint of {model_name}"


def _offline_error(model_name: str, weights: Optional[str]) -> WeightsUnavailableError:
    """The whole reason in one line: no network and no cached copy, what to download and from
    where, and what to pass instead (named as the ``pretrained`` argument, not a flag)."""
    host = _hf_host() if model_name.startswith("hf-hub:") else _weights_host(model_name, weights or "")
    return WeightsUnavailableError(
        f"cannot get the weights of {model_name} ({weights or 'hub'}): {host or 'the download host'} is not "
        f"reachable and no copy is cached; download {_download_source(model_name, weights)} "
        f"where there is network and pass its local path as pretrained, or pretrained 'none' to run on random "
        f"weights (a smoke run: the labels are meaningless)")


def _resolve_weights(model_name: str, pretrained: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(open_clip's ``pretrained`` argument, the host it must be fetched from or None if local)."""
    _check_config(model_name)
    if model_name.startswith("hf-hub:"):
        return None, _hf_host()
    if model_name.startswith("local-dir:") or pretrained is None or pretrained.lower() in RANDOM_WEIGHTS:
        return None, None
    if os.path.isfile(pretrained):
        return pretrained, None
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise WeightsUnavailableError(
            f"pretrained {pretrained!r} is neither a file nor an open_clip tag of {model_name} "
            f"(tags: {', '.join(tags) or 'none'}); pass a local checkpoint path")
    return pretrained, _weights_host(model_name, pretrained)


def check_weights_available(model_name: str, pretrained: Optional[str]) -> None:
    """Fail in about a second, without building the model, wherever ``load_clip`` would fail to
    get weights: unknown model or tag, missing file, or no network and no cached copy."""
    weights, host = _resolve_weights(model_name, pretrained)
    if host is None or _reachable(host):
        return
    try:
        with _hub_offline():
            if model_name.startswith("hf-hub:"):
                from huggingface_hub import hf_hub_download
                hf_hub_download(model_name[len("hf-hub:"):], "open_clip_config.json")
            else:
                open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(model_name, weights))
    except Exception:  # huggingface_hub and urllib raise many kinds
        raise _offline_error(model_name, weights) from None


def load_clip(model_name: str, pretrained: Optional[str], device: str | torch.device = "cpu") -> LoadedCLIP:
    """Build the model in eval mode on ``device`` with the requested weights."""
    weights, host = _resolve_weights(model_name, pretrained)
    schema_source = model_name.startswith(("hf-hub:", "local-dir:"))
    offline = bool(host) and not _reachable(host)
    try:
        with _hub_offline(offline):
            model = open_clip.create_model(model_name, pretrained=weights, device=device,
                                           load_weights=weights is not None or schema_source)
    except (RuntimeError, OSError) as err:
        if offline:
            raise _offline_error(model_name, weights) from err
        reason = " ".join(str(err).split()) or type(err).__name__  # the whole reason, on one line
        raise WeightsUnavailableError(f"could not load the weights of {model_name} ({weights or 'hub'}): "
                                      f"{reason}") from err
    if weights is None and not schema_source:
        log.warning("model %s has random weights (pretrained=%r): outputs are meaningless", model_name, pretrained)
    check_supported(model.visual)
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", OPENAI_MEAN))
    std = tuple(cfg.get("std", OPENAI_STD))
    return LoadedCLIP(model, open_clip.get_tokenizer(model_name), mean, std)
