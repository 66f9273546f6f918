"""Reading a config: YAML plus flag overrides, validated, with pydantic's errors turned into one
``key: what is wrong`` line."""
from __future__ import annotations

from typing import Optional

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from pipeline.config.errors import ConfigError
from pipeline.config.keys import field_at, section_fields, section_model
from pipeline.config.label_config import ADAPTER, LabelConfig
from pipeline.io.text_file import TextFileError, read_yaml


_PHRASES = {
    "int_type": "expected an integer", "int_from_float": "expected an integer", "int_parsing": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
    "model_type": "expected a mapping", "dataclass_type": "expected a mapping",
}


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _known_keys(loc: tuple) -> list[str]:
    """The keys next to the unknown one at ``loc``: its section's (nested ones too), or the top level's."""
    parent = field_at(loc[:-1]) if len(loc) > 1 else None
    section = section_model(parent) if parent is not None else None
    return list(section_fields(section) if section else LabelConfig.__pydantic_fields__)


def error_message(err: ValidationError, section: Optional[str] = None) -> str:
    """The first problem as one line: ``key: what is wrong``; ``section`` names the config
    section of a settings model validated on its own (e.g. ``thresholds``)."""
    first = err.errors(include_url=False)[0]
    kind, ctx, got = first["type"], first.get("ctx") or {}, first.get("input")
    loc = ((section,) if section else ()) + tuple(first["loc"])
    key = _dotted(loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {key} (known: {', '.join(sorted(_known_keys(loc)))})"
    if kind == "value_error":
        message = str(ctx.get("error", first["msg"]))
        return f"{key}: {message}" if key else message
    if kind == "missing":
        return f"{key}: required"
    if kind == "literal_error":
        return f"{key}: one of {ctx['expected'].replace(' or ', ', ')}; got {got!r}"
    if kind == "greater_than":
        bound = "positive" if ctx["gt"] == 0 else f"> {ctx['gt']}"
        return f"{key}: must be {bound}, got {got}"
    if kind in ("greater_than_equal", "less_than_equal", "less_than"):
        field = _field_info(loc)
        low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None) if field else None
        high = next((m.le for m in field.metadata if hasattr(m, "le")), None) if field else None
        if low is not None and high is not None:
            return f"{key}: must be in [{low}, {high}], got {got}"
        op, bound = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
                     "less_than": ("<", "lt")}[kind]
        return f"{key}: must be {op} {ctx[bound]}, got {got}"
    if kind in _PHRASES:
        return f"{key}: {_PHRASES[kind]}, got {got!r}"
    return f"{key}: {first['msg'][0].lower()}{first['msg'][1:]}, got {got!r}"


def _field_info(loc: tuple) -> Optional[FieldInfo]:
    return field_at(loc)


def _read_yaml(path: str) -> dict:
    try:
        data = read_yaml(path, "config file", "a YAML file such as jobs/configs/local.yaml")
    except TextFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def load_storage_options(path: Optional[str] = None, given: Optional[dict] = None) -> dict:
    """The ``storage_options`` of a config file (if given), replaced by ``given`` (the
    --storage-options flag) when set, validated as ``label`` validates them: for the commands
    that read an output (export, show, report), which need no other key."""
    options = given if given is not None else (_read_yaml(path).get("storage_options") if path else None)
    field = LabelConfig.__pydantic_fields__["storage_options"]
    try:
        return TypeAdapter(field.annotation).validate_python(options or {})
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = _dotted(("storage_options",) + tuple(first["loc"]))
        return_text = _PHRASES.get(first["type"], first["msg"])
        raise ConfigError(f"{where}: {return_text}, got {first.get('input')!r:.60} (expected "
                          "{protocol: {option: value}}, e.g. {s3: {endpoint_url: http://127.0.0.1:9000}})") from None


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> LabelConfig:
    """Read YAML (if given), apply overrides (dotted keys allowed: 'gem.depth'), validate."""
    data: dict = _read_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        *sections, name = dotted.split(".")
        target = data
        for depth, section in enumerate(sections):  # nested sections: proxyclip.vfm.name
            if target.get(section) is None:
                target[section] = {}
            target = target[section]
            if not isinstance(target, dict):
                raise ConfigError(f"{'.'.join(sections[:depth + 1])}: expected a mapping, got {target!r}")
        target[name] = value
    for section in (name for name, info in LabelConfig.__pydantic_fields__.items() if section_model(info)):
        if data.get(section) is None and section in data:
            data[section] = {}
    try:
        return ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ConfigError(error_message(err)) from None
