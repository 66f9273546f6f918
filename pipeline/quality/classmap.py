"""Which vocabulary entries stand for which ground-truth class, and what the rest of the pixels are.

Several vocabulary names may map to one ground-truth class (``person: [person, man, woman]``).
Without a mapping file, a vocabulary name equal to a class name (case aside) maps to it. Pixels
given no class, or a vocabulary entry mapped to no class, are predicted ``background`` when the
class list has a background class, else "no class". Ground-truth classes no vocabulary entry maps
to are ignored (255) or turned into background, as the user says (``unmapped``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.quality.groundtruth import GroundTruthError
from pipeline.quality.metrics import IGNORE_INDEX
from pipeline.io.text_file import TextFileError, read_yaml

UNMAPPED_CHOICES = ("ignore", "background")


@dataclass
class ClassMapping:
    class_names: list[str]             # ground-truth classes, index = value in the masks
    vocab: list[str]
    vocab_to_class: dict[str, int]     # vocabulary name -> ground-truth class index
    background: Optional[int]          # index of the background class, if any
    unmapped: str                      # ignore | background

    @property
    def no_class(self) -> int:
        """The prediction for a pixel that is no ground-truth class."""
        return self.background if self.background is not None else len(self.class_names)

    @property
    def evaluated(self) -> list[int]:
        """Classes a prediction can hit: the mapped ones and background."""
        mapped = set(self.vocab_to_class.values()) | ({self.background} if self.background is not None else set())
        return sorted(mapped)

    def class_of(self, vocab_name: str) -> int:
        return self.vocab_to_class.get(vocab_name, self.no_class)

    def ground_truth_lookup(self) -> np.ndarray:
        """256 entries: mask value -> the value scored (unmapped classes -> 255 or background)."""
        lookup = np.arange(256, dtype=np.uint8)
        for index in range(len(self.class_names)):
            if index not in self.evaluated:
                lookup[index] = IGNORE_INDEX if self.unmapped == "ignore" else self.background
        return lookup

    def as_dict(self) -> dict:
        return {"vocab_to_class": {v: self.class_names[i] for v, i in self.vocab_to_class.items()},
                "unmapped_vocab": [v for v in self.vocab if v not in self.vocab_to_class],
                "unmapped_classes": [n for i, n in enumerate(self.class_names) if i not in self.evaluated],
                "background": None if self.background is None else self.class_names[self.background],
                "unmapped": self.unmapped}


def read_mapping_file(path: str) -> dict[str, list[str]]:
    """YAML: ground-truth class -> a vocabulary name or a list of them."""
    try:
        data = read_yaml(path, "class map file")
    except TextFileError as err:
        raise GroundTruthError(str(err)) from None
    if not isinstance(data, dict):
        raise GroundTruthError(f"class map {path}: expected 'ground-truth class: [vocabulary names]' entries")
    return {str(k): [str(v) for v in (value if isinstance(value, list) else [value])] for k, value in data.items()}


def build_mapping(class_names: list[str], vocab: list[str], mapping: Optional[dict[str, list[str]]] = None,
                  unmapped: str = "ignore", background: Optional[str] = "background") -> ClassMapping:
    """``background``: name of the background class; "background" is used only if the list has it."""
    if unmapped not in UNMAPPED_CHOICES:
        raise GroundTruthError(f"unmapped: one of {', '.join(UNMAPPED_CHOICES)}; got {unmapped!r}")
    lower = {name.lower(): i for i, name in enumerate(class_names)}
    background_index = lower.get(background.lower()) if background else None
    if background and background_index is None and background != "background":
        raise GroundTruthError(f"background class {background!r} is not in the class list")
    vocab_to_class: dict[str, int] = {}
    if mapping is None:
        vocab_to_class = {name: lower[name.lower()] for name in vocab if name.lower() in lower}
    else:
        for gt_name, names in mapping.items():
            if gt_name.lower() not in lower:
                raise GroundTruthError(f"class map: {gt_name!r} is not a ground-truth class "
                                       f"({', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''})")
            for name in names:
                if name not in vocab:
                    raise GroundTruthError(f"class map: {name!r} is not in the vocabulary ({', '.join(vocab)})")
                if name in vocab_to_class:
                    raise GroundTruthError(f"class map: {name!r} is mapped twice")
                vocab_to_class[name] = lower[gt_name.lower()]
    if not vocab_to_class:
        raise GroundTruthError("no vocabulary entry maps to a ground-truth class; name them alike or give "
                               "a class map (ground-truth class: [vocabulary names])")
    if unmapped == "background" and background_index is None:
        raise GroundTruthError("unmapped: background needs a background class in the class list")
    return ClassMapping(list(class_names), list(vocab), vocab_to_class, background_index, unmapped)
