"""The vocabulary's text embeddings, encoded once per run and cached under the output prefix.

Encoding 150 classes x 80 templates costs minutes on a CPU; it depends only on the model, its
weights, the class names, the templates and the precision it was encoded in. So one worker
encodes (or reads ``OUT/_cache/text-<key>.pt``), the driver hands the tensor to the other
workers through Ray's object store, and a scheduled rerun over new shards reads the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional

import torch

from pipeline.storage import StorageOptions, exists, join, read_bytes, write_bytes_atomic

CACHE_DIR = "_cache"


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content (a checkpoint renamed or copied keeps its key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(value: Optional[str]) -> Optional[str]:
    """A local file (weights, model config) by its content; anything else (a tag) by its name."""
    if value and os.path.isfile(value):
        return "sha256:" + file_digest(value)
    if value and os.path.isdir(value):
        return "dir-sha256:" + hashlib.sha256(b"".join(
            file_digest(str(p)).encode() for p in sorted(Path(value).glob("*.json")))).hexdigest()
    return value


def text_cache_key(model: str, pretrained: Optional[str], model_config: Optional[str], class_names: list[str],
                   templates: list[str], dtype: Optional[torch.dtype]) -> str:
    source = {"model": model, "weights": _identity(pretrained), "model_config": _identity(model_config),
              "vocab": list(class_names), "templates": list(templates), "dtype": str(dtype or torch.float32)}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]


def text_cache_url(output: str, key: str) -> str:
    return join(join(output, CACHE_DIR), f"text-{key}.pt")


def read_cached(url: str, storage_options: Optional[StorageOptions] = None) -> Optional[torch.Tensor]:
    """The cached (classes, dim) embeddings, or None if absent or unreadable (then re-encoded)."""
    if not exists(url, storage_options):
        return None
    try:
        return torch.load(io.BytesIO(read_bytes(url, storage_options)), weights_only=True)["embeddings"]
    except Exception:  # a damaged cache file is not an error: it is rewritten
        return None


def write_cached(url: str, embeddings: torch.Tensor, storage_options: Optional[StorageOptions] = None) -> None:
    buffer = io.BytesIO()
    torch.save({"embeddings": embeddings.detach().float().cpu()}, buffer)
    write_bytes_atomic(url, buffer.getvalue(), storage_options)
