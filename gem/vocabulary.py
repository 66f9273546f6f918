"""Text side: class names x prompt templates -> one normalised embedding per class, cached.

Text embeddings depend only on (class names, templates), never on the image, so they are
computed once per vocabulary and reused for every batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gem.templates import clean_class_names, resolve_templates, TemplateSpec


@dataclass(frozen=True)
class Vocabulary:
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    embeddings: torch.Tensor  # (num_classes, embed_dim), L2-normalised

    def __len__(self) -> int:
        return len(self.class_names)


class TextEmbeddingCache:
    """Encodes vocabularies with a CLIP text tower, at most once per (names, templates)."""

    def __init__(self, encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                 device: torch.device, batch_size: int = 512):
        self._encode_text, self._tokenizer = encode_text, tokenizer
        self._device, self._batch_size = device, batch_size
        self._cache: dict[tuple, Vocabulary] = {}
        self.encoded_prompts = 0  # how many prompts went through the text tower (for tests/bench)

    @torch.no_grad()
    def _embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(prompts), self._batch_size):
            tokens = self._tokenizer(list(prompts[start:start + self._batch_size])).to(self._device)
            chunks.append(F.normalize(self._encode_text(tokens).float(), dim=-1))
        self.encoded_prompts += len(prompts)
        return torch.cat(chunks)

    def get(self, class_names: Sequence[str], templates: TemplateSpec = None) -> Vocabulary:
        names, resolved = clean_class_names(class_names), resolve_templates(templates)
        key = (names, resolved)
        if key not in self._cache:
            prompts = [template.format(name) for name in names for template in resolved]
            per_prompt = self._embed_prompts(prompts).view(len(names), len(resolved), -1)
            embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
            self._cache[key] = Vocabulary(names, resolved, embeddings)
        return self._cache[key]
