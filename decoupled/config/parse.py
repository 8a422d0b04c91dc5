"""TOML files and `--set section.key=value` into a JobConfig, each value checked against its field
(type, Literal choices, range, registry) as it is set, so the error names the field and the fix."""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Literal

from .schema import ConfigError, JobConfig, registry_names


def _sections() -> dict[str, type]:
    return typing.get_type_hints(JobConfig)


def _fields(cls) -> dict[str, tuple[typing.Any, dict]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}


def _type_name(typ) -> str:
    return getattr(typ, "__name__", str(typ))


def _check_rules(path: str, value, meta: dict) -> None:
    """The field's range (each element of a list) and registry."""
    items = value if isinstance(value, list) else [value]  # emptiness of a list is a cross-field rule
    for v in items:
        for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
            if op in meta and not ok(v, meta[op]):
                raise ConfigError(f"{path}={value!r} must be {bound} {meta[op]}"
                                  + (" (every element)" if isinstance(value, list) else ""))
    if "registry" in meta and not (value == "" and meta.get("empty_ok")):
        names = registry_names(meta["registry"])
        if value not in names:
            raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(repr, names))}")


def _coerce(path: str, value, typ, meta: dict | None = None):
    """Check `value` against the field's type and rules; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    meta = meta or {}
    if isinstance(value, bool) and "from_bool" in meta:  # a former bool field: false / true -> its choices
        value = meta["from_bool"][value]
    if value == "auto" and meta.get("auto_ok"):  # a list field that may also be chosen by measurement
        return value
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of {_type_name(inner)}, got {value!r}")
        value = [_coerce(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise ConfigError(f"{path} must be {_type_name(typ)}, got {value!r}")
    _check_rules(path, value, meta)
    return value


def _apply(cfg: JobConfig, section: str, key: str, value, where: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {where}; valid sections: {', '.join(sections)}")
    fields = _fields(sections[section])
    if key not in fields:
        raise ConfigError(f"unknown key {section}.{key} in {where}; valid keys of [{section}]: "
                          f"{', '.join(fields)}")
    typ, meta = fields[key]
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, typ, meta))


def _parse_value(text: str):
    """`--set` values are TOML literals; a bare word is taken as a string (name=vgg)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return float(text)  # numbers TOML is stricter about, such as .001 or 1.
    except ValueError:
        return text


def load(path: str | os.PathLike | None = None, overrides: list[str] = (), base: JobConfig | None = None,
         validate_now: bool = True) -> JobConfig:
    """Defaults (or a copy of `base`), then the TOML file, then the `--set` overrides, then validation."""
    cfg = copy.deepcopy(base) if base is not None else JobConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                                  f"valid sections: {', '.join(_sections())}")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        name, eq, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=3")
        _apply(cfg, section, key, _parse_value(text.strip()), "--set")
    if validate_now:
        from .rules import validate
        validate(cfg)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: JobConfig) -> str:
    """The resolved config; `load` of this text gives back an equal JobConfig."""
    lines = []
    for section in _sections():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
