"""Prompt templates: named built-in sets, user lists, or a file with one template a line."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, Sequence, Union

SINGLE_TEMPLATE = ("a photo of a {}.",)


def _imagenet_templates() -> tuple[str, ...]:
    # open_clip keeps CLIP's 80 ImageNet templates as functions of the class name.
    from gem.torchvision_shim import import_torchvision
    import_torchvision()
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


TEMPLATE_SETS = {"single": lambda: SINGLE_TEMPLATE, "imagenet80": _imagenet_templates}

TemplateSpec = Union[str, Sequence[str], None]


def validate_template(template: str) -> str:
    """Exactly one ``{}`` field and no other: ``{0}``, ``{name}``, ``{:>5}`` or a stray brace
    would fail (or format wrongly) in every worker."""
    if not isinstance(template, str):
        raise ValueError(f"a prompt template must be text, got {template!r}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise ValueError(f"a prompt template must contain '{{}}' exactly once ({err}), got {template!r}") from None
    if fields != [("", "", None)]:
        raise ValueError(f"a prompt template must contain '{{}}' exactly once and no other {{...}} field, "
                         f"got {template!r}")
    return template


def resolve_templates(spec: TemplateSpec) -> tuple[str, ...]:
    """'single' | 'imagenet80' | a path to a text file | one template | a list of templates."""
    if spec is None:
        return SINGLE_TEMPLATE
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]()
        if "{}" not in spec and Path(spec).is_file():
            lines = Path(spec).read_text(encoding="utf-8").splitlines()
            spec = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        elif "{}" not in spec:
            raise ValueError(f"templates: {spec!r} is neither a built-in set {sorted(TEMPLATE_SETS)}, "
                             "a file, nor a template containing '{}'")
        else:
            spec = [spec]
    templates = tuple(validate_template(t) for t in spec)
    if not templates:
        raise ValueError("templates: the list is empty")
    return templates


def clean_class_names(names: Iterable[str]) -> tuple[str, ...]:
    """Strip names, reject empty and duplicate ones (a duplicate would split a class's pixels)."""
    cleaned = tuple(name.strip() for name in names)
    if not cleaned:
        raise ValueError("the vocabulary is empty: give at least one class name")
    if any(not name for name in cleaned):
        raise ValueError("the vocabulary has an empty class name")
    folded = [name.casefold() for name in cleaned]  # the tokenizer lowercases: Dog and dog are one class
    duplicates = sorted({n for n, key in zip(cleaned, folded) if folded.count(key) > 1})
    if duplicates:
        raise ValueError(f"the vocabulary repeats class names (case-insensitively): {duplicates}")
    return cleaned
