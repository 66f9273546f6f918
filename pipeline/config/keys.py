"""The schema's leaf keys as the YAML, the flags and the docs see them: names, kinds, defaults and
help, and the generated configuration table (``python -m pipeline.config``)."""
from __future__ import annotations

import json
import typing
from dataclasses import dataclass as plain_dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config.label_config import LabelConfig


@plain_dataclass(frozen=True)
class ConfigKey:
    """One leaf key of the schema, as the YAML, the flags and the docs see it."""

    key: str              # dotted: "gem.depth"
    annotation: Any
    default: Any
    description: str
    flag: Optional[str]   # None: no flag (see no_flag)
    cli: Optional[str]    # how the flag's text is parsed: None, "comma", "json"
    no_flag: Optional[str] = None

    @property
    def kind(self) -> str:
        """bool | int | float | list-int | list-str | str | mapping."""
        return _kind(self.annotation)


def _kind(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:  # StrictInt and friends
        return _kind(typing.get_args(annotation)[0])
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is Union:
        return _kind(args[0]) if len(args) == 1 else "str"  # templates: one name, file or template
    if origin is Literal:
        return "choice"
    if origin is list:
        return "list-" + _kind(args[0])
    if origin is tuple:  # fixed-length triples (a VFM's mean and std)
        return "list-" + _kind(args[0])
    if origin is dict:
        return "mapping"
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "str")


def _extra(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _leaf(key: str, info: FieldInfo, flag_name: str) -> ConfigKey:
    extra = _extra(info)
    default = info.get_default(call_default_factory=True)
    cli = extra.get("cli") or ("json" if _kind(info.annotation) == "mapping" else None)  # arch overrides
    return ConfigKey(key, info.annotation, default, info.description or "",
                     extra.get("flag", "--" + flag_name.replace("_", "-")), cli, extra.get("no_flag"))


def section_model(info: FieldInfo) -> Optional[type[BaseModel]]:
    """The section model of a top-level key (gem, thresholds, slide, pamr), or None for a leaf."""
    model = info.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def section_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A section's keys; library settings held as top-level keys (``method``) are not among them."""
    return {name: info for name, info in model.model_fields.items() if not _extra(info).get("top_level")}


def config_keys() -> list[ConfigKey]:
    """Every leaf key, in schema order; sections' keys get flags named after the leaf and the
    section's flag_prefix (--depth, --slide-crop) unless they name their own (--pamr)."""
    keys = []
    for name, info in LabelConfig.__pydantic_fields__.items():
        section = section_model(info)
        if section is None:
            keys.append(_leaf(name, info, name))
        else:
            keys += _section_keys(name, section, _extra(info).get("flag_prefix", ""))
    return keys


def _section_keys(dotted: str, section: type[BaseModel], prefix: str) -> list[ConfigKey]:
    """A section's leaves; a sub-section's (``proxyclip.vfm``) get flags prefixed with its name
    alone (``--vfm-name``)."""
    keys = []
    for leaf, leaf_info in section_fields(section).items():
        sub = section_model(leaf_info)
        if sub is None:
            keys.append(_leaf(f"{dotted}.{leaf}", leaf_info, prefix + leaf))
        else:
            keys += _section_keys(f"{dotted}.{leaf}", sub, f"{leaf}-")
    return keys


def field_at(path: tuple) -> Optional[FieldInfo]:
    """The schema field at a dotted path (``("proxyclip", "vfm", "name")``), or None."""
    fields: dict[str, FieldInfo] = LabelConfig.__pydantic_fields__
    info = None
    for part in path:
        if fields is None or not isinstance(part, str) or part not in fields:
            return None
        info = fields[part]
        section = section_model(info)
        fields = section_fields(section) if section is not None else None
    return info


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value) if value else ("{}" if isinstance(value, dict) else "[]")
    return str(value)


def default_text(key: ConfigKey) -> str:
    if key.key in ("input", "output", "vocab"):
        return "required" if key.key != "vocab" else "required (or vocab_file)"
    return _shown(key.default)


def markdown_table() -> str:
    """The configuration table of docs/configuration.md (a test checks the page holds exactly this)."""
    rows = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for key in config_keys():
        flag = f"`{key.flag}`" if key.flag else f"— ({key.no_flag})"
        meaning = key.description.replace("|", "\\|")
        rows.append(f"| `{key.key}` | {flag} | `{default_text(key)}` | {meaning} |")
    return "\n".join(rows)
