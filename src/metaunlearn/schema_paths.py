"""Walking a config schema along a dotted path: applying `dotted.key=value`
overrides to a raw mapping, and turning a pydantic error into one line that
names the key and the valid choices. Schema-generic: plugin sections are
recognised by their `registry`."""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from .errors import ConfigError


def _strip_optional(ann: Any) -> Any:
    args = [a for a in get_args(ann) if a is not type(None)]
    return args[0] if get_origin(ann) is Union and len(args) == 1 else ann


def _model_of(ann: Any) -> Optional[type[BaseModel]]:
    ann = _strip_optional(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _dict_of(ann: Any) -> Any:
    """The dict annotation of `ann`, or of the member of a Union that is one (`str | dict[...]`)."""
    ann = _strip_optional(ann)
    if get_origin(ann) is dict:
        return ann
    if get_origin(ann) is Union:
        return next((a for a in get_args(ann) if get_origin(a) is dict), None)
    return None


def is_container(ann: Any) -> bool:
    return _model_of(ann) is not None or get_origin(_strip_optional(ann)) is list


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys a section accepts: its fields, and a plugin section's plugin names."""
    registry = getattr(model, "registry", None)  # a config.PluginSection
    return [*model.model_fields, *(registry.names() if registry is not None else [])]


def _child(model: type[BaseModel], part: Union[str, int]) -> Any:
    """The annotation of key `part` of `model`, or None when it has no such key."""
    if part in model.model_fields:
        return model.model_fields[part].annotation
    registry = getattr(model, "registry", None)
    if registry is not None and part in registry:
        return registry.get(str(part)).options
    return None


def annotation_at(loc: Iterable[Union[str, int]], root: type[BaseModel]) -> Any:
    """The annotation at `loc` (field names and list indices) below `root`, or None."""
    ann: Any = root
    for part in loc:
        ann, model = _strip_optional(ann), _model_of(ann)
        if model is not None and _child(model, part) is not None:
            ann = _child(model, part)
        elif get_origin(ann) in (list, tuple) and str(part).isdigit():
            args = get_args(ann)
            ann = args[0] if get_origin(ann) is list else args[min(int(part), len(args) - 1)]
        elif _dict_of(ann) is not None:
            ann = get_args(_dict_of(ann))[1]
        else:
            return None
    return _strip_optional(ann)


def apply_override(data: dict, item: str, root: type[BaseModel]) -> None:
    """Set `dotted.key=value` in the raw mapping `data`, walking `root`'s schema for the key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value (e.g. method.steps=100)")
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        here, above = ".".join(parts[: i + 1]), ".".join(parts[:i])
        parent = annotation_at(parts[:i], root)
        model = _model_of(parent)
        if model is not None:
            if _child(model, part) is None:
                raise ConfigError(f"override '{key}': unknown key '{here}'; valid keys: {', '.join(_keys(model))}")
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{above}' is not a mapping in the file")
            slot: Any = part
        elif get_origin(parent) is list and part.isdigit():
            slot, size = int(part), len(node) if isinstance(node, list) else 0
            if slot >= size:
                raise ConfigError(f"override '{key}': index {slot} out of range, '{above}' has {size} entries")
        elif _dict_of(parent) is not None:
            allowed = get_args(get_args(_dict_of(parent))[0])  # a Literal key type names the valid keys
            if allowed and part not in allowed:
                raise ConfigError(f"override '{key}': unknown key '{here}'; valid keys: {', '.join(allowed)}")
            slot = part
        else:
            raise ConfigError(f"override '{key}': '{above}' has no key or index '{part}'")
        if i < len(parts) - 1:
            child = node.get(slot) if isinstance(node, dict) else node[slot]
            if not isinstance(child, (dict, list)) and _dict_of(annotation_at(parts[: i + 1], root)) is not None:
                child = None  # `reference: auto` given per role from here on: a mapping replaces the text
            if child is None:  # a section the file leaves out: start it empty
                child = node[slot] = [] if get_origin(annotation_at(parts[: i + 1], root)) is list else {}
            node = child
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': '{text}' is not a valid YAML value") from None
    # For text fields `name=123` or `mixed_precision=no` mean the text, not YAML's int or bool.
    target = annotation_at(parts, root)
    textual = target is str or (get_origin(target) is Literal and all(isinstance(a, str) for a in get_args(target)))
    node[slot] = text.strip() if textual and value is not None and not isinstance(value, str) else value


def describe_error(err: dict, root: type[BaseModel]) -> str:
    """One line for one pydantic error below `root`: the dotted key and what is wrong with it."""
    loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
    path = ".".join(str(p) for p in loc)
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "extra_forbidden":
        model = _model_of(annotation_at(loc[:-1], root))
        return f"unknown key '{path}'; valid keys: {', '.join(_keys(model)) if model else '?'}"
    if kind == "literal_error":
        allowed = ", ".join(map(str, get_args(annotation_at(loc, root)))) or err.get("ctx", {}).get("expected", "?")
        return f"{path}: {got} is not allowed; choose one of: {allowed}"
    if kind == "missing":
        return f"{path}: required but missing"
    if kind == "string_pattern_mismatch":
        return f"{path}: {got} is not a valid name; use letters, digits, '-', '_' and '.'"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_of(annotation_at(loc, root))
        return f"{path}: expected a mapping{' of ' + ', '.join(_keys(model)) if model else ''}, got {got}"
    if kind == "value_error":  # our validators phrase their message to follow the key
        msg = msg.removeprefix("Value error, ")
        return f"{path}: {msg}" if path and msg.startswith("'") else (f"{path} {msg}" if path else msg)
    return f"{path}: {msg[0].lower() + msg[1:]} (got {got})"
