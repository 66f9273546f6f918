"""Text side: class names x prompt templates -> one normalised embedding per class, cached.

Text embeddings depend only on (class names, templates), never on the image, so they are
computed once per vocabulary and reused for every batch.

A class is one name or several (synonyms: ``["person", "man", "woman"]``); background names
(``sky``, ``wall``, ...) compete with the classes but are never a label. Every name ("word")
gets its own embedding; ``gem.dense`` takes each class's max over its words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from gem.templates import clean_class_names, resolve_templates, TemplateSpec


ClassEntry = Union[str, Sequence[str]]  # a name, or a class's names (the first is its label)


@dataclass(frozen=True)
class Vocabulary:
    class_names: tuple[str, ...]  # one per class: its first name, the one written as its label
    templates: tuple[str, ...]
    embeddings: torch.Tensor  # (num_words, embed_dim), L2-normalised: classes' names, then background
    synonyms: tuple[tuple[str, ...], ...] = ()  # every class's names; () = one name per class
    background: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def words(self) -> tuple[str, ...]:
        groups = self.synonyms or tuple((name,) for name in self.class_names)
        return tuple(word for group in groups for word in group) + self.background

    @property
    def word_class(self) -> torch.Tensor:
        """(num_words,) class index of each embedding row; background names: len(self)."""
        groups = self.synonyms or tuple((name,) for name in self.class_names)
        index = [i for i, group in enumerate(groups) for _ in group] + [len(groups)] * len(self.background)
        return torch.tensor(index, dtype=torch.long)


def class_groups(entries: Sequence[ClassEntry]) -> tuple[tuple[str, ...], ...]:
    """Each entry -> its tuple of names (a plain string is one name, never split)."""
    return tuple((entry,) if isinstance(entry, str) else tuple(entry) for entry in entries)


class TextEmbeddingCache:
    """Encodes vocabularies with a CLIP text tower, at most once per (names, templates)."""

    def __init__(self, encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                 device: torch.device, batch_size: int = 512):
        self._encode_text, self._tokenizer = encode_text, tokenizer
        self._device, self._batch_size = device, batch_size
        self._cache: dict[tuple, Vocabulary] = {}
        self.encoded_prompts = 0  # how many prompts went through the text tower (for tests/bench)

    @torch.no_grad()
    def _embed_prompts(self, prompts: Sequence[str], progress: Optional[Callable[[int, int], None]] = None
                       ) -> torch.Tensor:
        """``progress(done, total)`` after each batch: on a CPU this takes minutes."""
        chunks = []
        for start in range(0, len(prompts), self._batch_size):
            tokens = self._tokenizer(list(prompts[start:start + self._batch_size])).to(self._device)
            chunks.append(F.normalize(self._encode_text(tokens).float(), dim=-1))
            if progress is not None:
                progress(min(start + self._batch_size, len(prompts)), len(prompts))
        self.encoded_prompts += len(prompts)
        return torch.cat(chunks)

    def get(self, class_names: Sequence[ClassEntry], templates: TemplateSpec = None,
            background: Sequence[str] = (), progress: Optional[Callable[[int, int], None]] = None) -> Vocabulary:
        """class_names: one entry per class, a name or a list of synonyms; background: names that
        compete with the classes but are never labels."""
        groups, resolved = class_groups(class_names), resolve_templates(templates)
        if not groups or any(not group for group in groups):
            raise ValueError("the vocabulary is empty, or has a class with no name")
        background = tuple(background)
        words = clean_class_names([w for group in groups for w in group] + list(background))
        groups = tuple(tuple(name.strip() for name in group) for group in groups)
        background = words[len(words) - len(background):] if background else ()
        key = (groups, background, resolved)
        if key not in self._cache:
            prompts = [template.format(name) for name in words for template in resolved]
            if progress is not None:
                progress(0, len(prompts))
            per_prompt = self._embed_prompts(prompts, progress).view(len(words), len(resolved), -1)
            embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
            synonyms = groups if any(len(group) > 1 for group in groups) or background else ()
            self._cache[key] = Vocabulary(tuple(group[0] for group in groups), resolved, embeddings,
                                          synonyms, background)
        return self._cache[key]
