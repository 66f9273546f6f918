"""The vocabulary's text embeddings, encoded once per run and cached under the output prefix.

Encoding 150 classes x 80 templates costs minutes on a CPU; it depends only on the model, its
weights, the class names (and synonyms, background names), the templates and the precision it was
encoded in. So one worker encodes (or reads ``OUT/_cache/text-<key>.pt``), the driver hands the
vocabulary (its embeddings and which class each belongs to) to the other workers through Ray's
object store, and a scheduled rerun over new shards reads the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from gem.vocabulary import ClassEntry, Vocabulary
from pipeline.store.layout import OutputLayout
from pipeline.io.storage import Location


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


def text_cache_key(model: str, pretrained: Optional[str], model_config: Optional[str],
                   class_names: Sequence[ClassEntry], templates: Sequence[str], dtype: Optional[torch.dtype],
                   background: Sequence[str] = ()) -> str:
    """What the embeddings depend on: the model, its weights' content, the classes (with their
    synonyms), the background names, the templates and the precision they were encoded in."""
    source = {"model": model, "weights": _identity(pretrained), "model_config": _identity(model_config),
              "vocab": [entry if isinstance(entry, str) else list(entry) for entry in class_names],
              "background": list(background), "templates": list(templates), "dtype": str(dtype or torch.float32)}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]


def text_cache_file(layout: OutputLayout, key: str) -> Location:
    return layout.cache_dir.child(f"text-{key}.pt")


def read_cached(file: Location) -> Optional[Vocabulary]:
    """The cached vocabulary (its (words, dim) embeddings on the CPU), or None if absent or
    unreadable (then it is encoded again)."""
    if not file.exists():
        return None
    try:
        fields = torch.load(io.BytesIO(file.read_bytes()), weights_only=True)
        return Vocabulary(tuple(fields["class_names"]), tuple(fields["templates"]), fields["embeddings"],
                          tuple(tuple(group) for group in fields["synonyms"]), tuple(fields["background"]))
    except Exception:  # a damaged or older cache file is not an error: it is rewritten
        return None


def write_cached(file: Location, vocabulary: Vocabulary) -> None:
    buffer = io.BytesIO()
    torch.save({"class_names": list(vocabulary.class_names), "templates": list(vocabulary.templates),
                "embeddings": vocabulary.embeddings.detach().float().cpu(),
                "synonyms": [list(group) for group in vocabulary.synonyms],
                "background": list(vocabulary.background)}, buffer)
    file.write_bytes_atomic(buffer.getvalue())
