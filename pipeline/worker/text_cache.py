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

from gem.vocabulary import ClassEntry, Vocabulary, class_groups
from pipeline.io.tar import error_text
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


def cache_source(model: str, pretrained: Optional[str], model_config: Optional[str],
                 class_names: Sequence[ClassEntry], templates: Sequence[str], dtype: Optional[torch.dtype],
                 background: Sequence[str] = ()) -> dict:
    """What the embeddings depend on: the model, its weights' content, the classes (with their
    synonyms), the background names, the templates and the precision they were encoded in. Hashed
    into the file's name and stored in the file, where loading checks it."""
    return {"model": model, "weights": _identity(pretrained), "model_config": _identity(model_config),
            "vocab": [entry if isinstance(entry, str) else list(entry) for entry in class_names],
            "background": list(background), "templates": list(templates), "dtype": str(dtype or torch.float32)}


def source_key(source: dict) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]


def text_cache_key(model: str, pretrained: Optional[str], model_config: Optional[str],
                   class_names: Sequence[ClassEntry], templates: Sequence[str], dtype: Optional[torch.dtype],
                   background: Sequence[str] = ()) -> str:
    """The cache file's key: a hash of ``cache_source``."""
    return source_key(cache_source(model, pretrained, model_config, class_names, templates, dtype, background))


def text_cache_file(layout: OutputLayout, key: str) -> Location:
    return layout.cache_dir.child(f"text-{key}.pt")


FORMAT = 2  # the cache file's layout; files of another format are encoded again
_NORM_TOLERANCE = 1e-3   # rows are L2-normalised
_PROBE_COSINE = 0.99     # a re-encoded word against its cached row (same model and precision)


def _digest(embeddings: torch.Tensor) -> str:
    return hashlib.sha256(embeddings.contiguous().numpy().tobytes()).hexdigest()


def expected_words(source: dict) -> tuple[str, ...]:
    """The embedding rows' words, in order, as the encoder names them (stripped)."""
    groups = class_groups(source["vocab"])
    return tuple(w.strip() for group in groups for w in group) + tuple(b.strip() for b in source["background"])


def check_cached(fields: dict, source: dict) -> Optional[str]:
    """Why a loaded cache file's content is not the vocabulary ``source`` describes (None: it is).
    Its recorded source, names, templates, dtype, shape, content digest and finiteness are checked."""
    if fields.get("format") != FORMAT:
        return f"format {fields.get('format')!r}, not {FORMAT}"
    if fields.get("source") != source:
        differ = sorted(k for k in set(source) | set(fields.get("source") or {})
                        if (fields.get("source") or {}).get(k) != source.get(k))
        return f"it was encoded for another {', '.join(differ)}"
    embeddings = fields["embeddings"]
    if not isinstance(embeddings, torch.Tensor) or embeddings.dtype != torch.float32 or embeddings.dim() != 2:
        return "its embeddings are not a float32 matrix"
    if str(embeddings.dtype) != fields.get("dtype") or list(embeddings.shape) != fields.get("shape"):
        return f"its embeddings are {embeddings.dtype} {list(embeddings.shape)}, it says {fields.get('dtype')} {fields.get('shape')}"
    words = expected_words(source)
    vocabulary = _vocabulary(fields)
    if vocabulary.words != words or vocabulary.class_names != tuple(g[0].strip() for g in class_groups(source["vocab"])):
        return "its class names are not this vocabulary's"
    if tuple(vocabulary.templates) != tuple(source["templates"]):
        return "its templates are not this run's"
    if embeddings.shape[0] != len(words):
        return f"it has {embeddings.shape[0]} embedding rows for {len(words)} names"
    if not bool(torch.isfinite(embeddings).all()):
        return "its embeddings are not all finite"
    if not torch.allclose(embeddings.norm(dim=-1), torch.ones(len(words)), atol=_NORM_TOLERANCE):
        return "its embeddings are not unit vectors"
    if _digest(embeddings) != fields.get("sha256"):
        return "its embeddings do not match their recorded digest"
    return None


def probe_words(vocabulary: Vocabulary) -> list[int]:
    """The rows re-encoded to check a cached file against the model: the first and the last."""
    return sorted({0, len(vocabulary.words) - 1})


def check_rows(vocabulary: Vocabulary, encoded: dict[int, torch.Tensor]) -> Optional[str]:
    """Why re-encoded rows (index -> embedding) disagree with the cached ones (None: they agree):
    another model's or vocabulary's rows, or rows in another order."""
    rows = vocabulary.embeddings.float()
    for index, embedding in encoded.items():
        embedding = embedding.float().reshape(-1).cpu()
        if embedding.shape[0] != rows.shape[1]:
            return f"its embeddings have {rows.shape[1]} dimensions, the model's {embedding.shape[0]}"
        cosine = torch.nn.functional.cosine_similarity(rows, embedding[None], dim=-1)
        if cosine[index] < _PROBE_COSINE or int(cosine.argmax()) != index:
            return f"its row for {vocabulary.words[index]!r} is not that name's embedding"
    return None


def _vocabulary(fields: dict) -> Vocabulary:
    return Vocabulary(tuple(fields["class_names"]), tuple(fields["templates"]), fields["embeddings"],
                      tuple(tuple(group) for group in fields["synonyms"]), tuple(fields["background"]))


def read_cached(file: Location, source: dict) -> tuple[Optional[Vocabulary], Optional[str]]:
    """(the cached vocabulary, its (words, dim) embeddings on the CPU, None) if the file holds
    exactly the vocabulary ``source`` describes; (None, why not) if it is unreadable or another's
    (then it is encoded again and rewritten); (None, None) if absent."""
    if not file.exists():
        return None, None
    try:
        fields = torch.load(io.BytesIO(file.read_bytes()), weights_only=True)
        problem = check_cached(fields, source) if isinstance(fields, dict) else "it is not a cache file"
        return (None, problem) if problem else (_vocabulary(fields), None)
    except Exception as err:  # a damaged or older cache file is not an error: it is rewritten
        return None, f"it cannot be read ({error_text(err)})"


def write_cached(file: Location, vocabulary: Vocabulary, source: dict) -> None:
    """The vocabulary with what it was encoded from (``cache_source``) and its shape, dtype and digest."""
    embeddings = vocabulary.embeddings.detach().float().cpu().contiguous()
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "source": source, "class_names": list(vocabulary.class_names),
                "templates": list(vocabulary.templates), "embeddings": embeddings,
                "dtype": str(embeddings.dtype), "shape": list(embeddings.shape), "sha256": _digest(embeddings),
                "synonyms": [list(group) for group in vocabulary.synonyms],
                "background": list(vocabulary.background)}, buffer)
    file.write_bytes_atomic(buffer.getvalue())
