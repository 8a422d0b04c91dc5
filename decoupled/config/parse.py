"""TOML files and `--set section.key=value` into a job, each value checked against its field (type,
Literal choices, range, registry) as it is set, so the error names the field and the fix. A plug-in
section's `name` is applied first: it picks the Config type whose keys the section may hold."""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from .schema import ConfigError, Schema

Item = tuple[str, str, typing.Any, str]  # section, key, value, where it was given


def section_names(schema: Schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema.job)]


def fields(cls) -> dict[str, tuple[typing.Any, dict]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}


def _type_name(typ) -> str:
    return getattr(typ, "__name__", str(typ))


def _check_rules(path: str, value, meta: dict, registries: dict) -> None:
    """The field's range (each element of a list) and registry."""
    items = value if isinstance(value, list) else [value]  # emptiness of a list is a cross-field rule
    for v in items:
        for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
            if op in meta and not ok(v, meta[op]):
                raise ConfigError(f"{path}={value!r} must be {bound} {meta[op]}"
                                  + (" (every element)" if isinstance(value, list) else ""))
    if "registry" in meta and not (value == "" and meta.get("empty_ok")):
        names = registries[meta["registry"]]
        if value not in names:
            raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(repr, names))}")


def _coerce_union(path: str, value, typ, meta: dict, registries: dict):
    """`list[int] | Literal["auto"]`: the arm that fits the value's kind decides (and words the error)."""
    arms = typing.get_args(typ)
    literal = next(a for a in arms if typing.get_origin(a) is Literal)
    if value in typing.get_args(literal):
        return value
    listed = next(a for a in arms if typing.get_origin(a) is list)
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be a list of {_type_name(typing.get_args(listed)[0])} or one of: "
                          f"{', '.join(map(repr, typing.get_args(literal)))}; got {value!r}")
    return coerce(path, value, listed, meta, registries)


def coerce(path: str, value, typ, meta: dict | None = None, registries: dict | None = None):
    """Check `value` against the field's type and rules; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    meta, registries = meta or {}, registries or {}
    if isinstance(value, bool) and "from_bool" in meta:  # a former bool field: false / true -> its choices
        value = meta["from_bool"][value]
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(path, value, typ, meta, registries)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of {_type_name(inner)}, got {value!r}")
        value = [coerce(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise ConfigError(f"{path} must be {_type_name(typ)}, got {value!r}")
    _check_rules(path, value, meta, registries)
    return value


def _choose(cfg, schema: Schema, section: str, name, where: str) -> None:
    """A plug-in section's `name`: its Config type, keeping the values of the keys both types have."""
    options = schema.choices[section]
    if not isinstance(name, str) or name not in options:
        raise ConfigError(f"{section}.name={name!r} is not valid; choose one of: {', '.join(map(repr, options))}")
    old, cls = getattr(cfg, section), options[name]
    if type(old) is not cls:
        keep = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
        old = cls(**{f.name: keep[f.name] for f in dataclasses.fields(cls) if f.name in keep})
    old.name = name
    setattr(cfg, section, old)


def _not_here(schema: Schema, cfg, section: str, key: str, value, where: str, final: bool) -> None:
    """A key the chosen plug-in does not have: harmless when its final value (a later --set may
    override it) repeats another plug-in's default (a run directory's config.toml of an older version
    lists every key), else an error naming the plug-ins that have it and the keys the chosen one has."""
    chosen = getattr(cfg, section)
    have = [n for n, c in schema.choices[section].items() if key in fields(c)]
    mine = f"valid keys of [{section}] with {section}.name={chosen.name!r}: {', '.join(fields(type(chosen)))}"
    if not have:
        raise ConfigError(f"unknown key {section}.{key} in {where}; {mine}")
    typ, meta = fields(schema.choices[section][have[0]])[key]
    default = getattr(schema.choices[section][have[0]](), key)
    if coerce(f"{section}.{key}", value, typ, meta, schema.registries) == default or not final:
        return
    what = f"{section}.name={have[0]!r}" if len(have) == 1 else f"{section}.name in {tuple(have)}"
    raise ConfigError(f"{section}.{key}={value!r} does nothing here: it applies to {what}; remove it (or "
                      f"choose what it applies to). The {mine}")


def _apply(schema: Schema, cfg, item: Item, final: bool) -> None:
    section, key, value, where = item
    obj = getattr(cfg, section)
    known = fields(type(obj))
    table, dot, entry = key.partition(".")
    if dot and table in known and known[table][0] is dict:  # `--set model.args.width=16`: one entry of a table
        getattr(obj, table)[entry] = value
        return
    if key not in known:
        if section in schema.choices:
            return _not_here(schema, cfg, section, key, value, where, final)
        raise ConfigError(f"unknown key {section}.{key} in {where}; valid keys of [{section}]: {', '.join(known)}")
    typ, meta = known[key]
    setattr(obj, key, coerce(f"{section}.{key}", value, typ, meta, schema.registries))


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


def _file_items(schema: Schema, path) -> list[Item]:
    if isinstance(path, Mapping):  # the [section] tables themselves (decoupled.load_config({...}))
        return _doc_items(schema, path, "the config dict")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    return _doc_items(schema, doc, str(path))


def _doc_items(schema: Schema, doc: Mapping, where: str) -> list[Item]:
    items = []
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: top-level key {section!r} must be a [section]; "
                              f"valid sections: {', '.join(section_names(schema))}")
        items += [(section, key, value, where) for key, value in table.items()]
    return items


def _set_items(overrides) -> list[Item]:
    items = []
    for item in overrides:
        name, eq, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=3")
        items.append((section, key.strip(), _parse_value(text.strip()), "--set"))
    return items


def parse(schema: Schema, path: str | os.PathLike | Mapping | None = None, overrides=(), base=None):
    """Defaults (or a copy of `base`), then the TOML file (or a dict of its [section] tables), then the
    `--set` overrides (not validated:
    rules.validate is the caller's next step)."""
    cfg = copy.deepcopy(base) if base is not None else schema.job()
    items = (_file_items(schema, path) if path else []) + _set_items(overrides)
    for section, _, _, where in items:
        if section not in section_names(schema):
            raise ConfigError(f"unknown section [{section}] in {where}; valid sections: "
                              f"{', '.join(section_names(schema))}")
    for section, key, value, where in items:  # the plug-in first: it decides which keys are valid
        if key == "name" and section in schema.choices:
            _choose(cfg, schema, section, value, where)
    last = {(section, key): i for i, (section, key, _, _) in enumerate(items)}
    for i, item in enumerate(items):
        if not (item[1] == "name" and item[0] in schema.choices):
            _apply(schema, cfg, item, final=last[item[:2]] == i)
    return cfg


def to_toml_value(v) -> str:
    """One value as a TOML literal (what `--set` parses back)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(to_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # a free-form table ([model.args]) as an inline table
        return "{" + ", ".join(f"{to_toml_value(str(k))} = {to_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg) -> str:
    """The resolved config; loading this text gives back an equal job."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {to_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
