"""Typed-dataclass configuration machinery, independent of what the config holds.

Owns: converting a YAML/``--set`` value to a field's declared type (PyYAML reads ``1e-3`` as a
string), building a dataclass from a nested dict with unknown-key errors that name the dotted
path and the closest valid key, checking a ``params`` dict against a registered builder's
keyword arguments, choice checks, and parsing ``a.b=c`` overrides. Does not own the schema,
its defaults or loading files (:mod:`dist_train.config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

from core.errors import ConfigError


def closest(key: str, names: list[str] | tuple[str, ...]) -> str | None:
    """The valid name a user most likely meant by ``key`` (``None`` if nothing is close)."""

    def initials(text: str) -> str:
        return "".join(part[0] for part in text.split("_") if part)

    for name in names:  # abbreviations: learning_rate -> lr, lr -> learning_rate
        if "_" in key and initials(key) == name or "_" in name and initials(name) == key:
            return name
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    for name in names:
        if len(name) > 2 and (name in key or key in name):
            return name
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.4)
    return close[0] if close else None


def unknown_key(prefix: str, key: str, names: list[str] | tuple[str, ...]) -> ConfigError:
    """The error for ``prefix + key``, naming the closest of ``names`` (``prefix`` ends in ".")."""
    near = closest(key, names)
    hint = f"; did you mean {prefix}{near}?" if near else ""
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def checked_value(path: str, value: Any, tp: Any) -> Any:
    """``value`` checked against a builder keyword's declared type ``tp``.

    Only plain ``bool``/``int``/``float``/``str`` are checked (other annotations pass as they
    are). A string given for a number or a bool (PyYAML reads ``1e-3`` as one) is converted;
    any other value is kept as written.
    """
    if tp not in (bool, int, float, str):
        return value
    converted = convert(path, value, tp)
    return converted if isinstance(value, str) and tp is not str else value


def check_builder_params(
    section: str,
    registry: Any,
    name: str,
    params: dict[str, Any],
    *,
    extra: dict[str, type] | None = None,
    section_fields: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``params`` of ``section`` checked against the keywords of ``registry``'s ``name`` builder.

    Args:
        section: ``"backbone"`` or ``"head"`` (for the dotted paths in messages).
        registry: the :class:`core.registry.Registry` holding ``name``.
        name: registered builder name (``section.name``).
        params: ``section.params``.
        extra: keys consumed by the trainer rather than the builder, with their types.
        section_fields: builder keywords the trainer fills from the section's own fields;
            giving them in ``params`` too raises.

    Returns:
        ``params`` with string numbers converted (see :func:`checked_value`).
    """
    if name not in registry:
        near = closest(name, registry.names())
        hint = f"; did you mean {near!r}?" if near else ""
        raise ConfigError(f"{section}.name={name!r} is not a registered {registry.kind}{hint}")
    declared = registry.keywords(name)
    if declared is None:  # a builder taking **kwargs: its keys cannot be listed
        return dict(params)
    allowed = {k: v for k, v in declared.items() if k not in section_fields}
    allowed.update(extra or {})
    path = f"{section}.params"
    checked = {}
    for key, value in params.items():
        if key in section_fields:
            raise ConfigError(f"{path}.{key}: set {section}.{key} instead")
        if key not in allowed:
            raise unknown_key(path + ".", key, list(allowed))
        checked[key] = checked_value(f"{path}.{key}", value, allowed[key])
    return checked


def check_choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises naming ``path`` and the closest choice when ``value`` is not one of ``choices``."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}={value!r} is not one of {list(choices)}{hint}")


def convert(path: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the declared type ``tp``; a value that does not fit raises."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert(path, value, args[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=path + ".")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if tp is list or origin is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if value else []
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if tp is dict or origin is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{path}={value!r} is not a valid {name}") from None
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instance of dataclass ``cls`` from a nested dict, checking keys and converting types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(prefix, key, names)
        kwargs[key] = convert(prefix + key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating sections."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", c)`` with ``c`` parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value
