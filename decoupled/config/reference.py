"""The key reference: every [section] key of a job, its type, default, where it acts and its
documentation, written between two markers of docs/configuration.md (decoupled/reference.py runs it).

A field's documentation is the comment block right above it and the comment after it on its line,
in the class that defines it: the convention schema.py and every plug-in's Config follow.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Literal

from .applies import APPLIES
from .parse import fields
from .schema import Schema

BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"
_FIELD = re.compile(r"^(\s*)(\w+)\s*:\s*[^=]+?(=.*)?$")


def field_docs(cls) -> dict[str, str]:
    """The documentation of every field `cls` itself defines, from its source comments."""
    lines, _ = inspect.getsourcelines(cls)
    body = len(lines[0]) - len(lines[0].lstrip()) + 4  # the class body's indentation
    own = set(cls.__dict__.get("__annotations__", {}))
    docs, block = {}, []
    for line in lines[1:]:
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if text.startswith("#") and indent == body:
            block.append(text.lstrip("# ").rstrip())
            continue
        m = _FIELD.match(line.split("  # ")[0])
        if m and len(m.group(1)) == body and m.group(2) in own:
            after = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            docs[m.group(2)] = " ".join(block + ([after] if after else []))
        if indent <= body:
            block = []
    return docs


def _doc(cls, key: str) -> str:
    """The nearest documentation of `key` up `cls`'s bases (a subclass may redefine a default only)."""
    for klass in cls.__mro__:
        if key in klass.__dict__.get("__annotations__", {}) and field_docs(klass).get(key):
            return field_docs(klass)[key]
    return ""


def _type(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return " \\| ".join(f'"{a}"' for a in typing.get_args(typ))
    if origin is list:
        return f"list[{_type(typing.get_args(typ)[0])}]"
    if typing.get_args(typ):
        return " \\| ".join(_type(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _value(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _entry(section: str, key: str, cls, owners: list[str] | None) -> str:
    typ, meta = fields(cls)[key]
    facts = [f"`{_type(typ)}`", f"default `{_value(getattr(cls(), key))}`"]
    if owners is not None:
        facts.append(f"{section}.name: {', '.join(f'`{n}`' for n in owners)}")
    rule = meta["acts"][1] if "acts" in meta else APPLIES.get(f"{section}.{key}", (None, None))[1]
    if rule:
        facts.append(f"acts with {rule}")
    doc = _doc(cls, key)
    return f"- **`{section}.{key}`** ({'; '.join(facts)})" + (f": {doc}" if doc else "")


def _section(schema: Schema, section: str) -> list[str]:
    lines = [f"### [{section}]", ""]
    options = schema.choices.get(section)
    if not options:
        cls = type(getattr(schema.job(), section))
        return lines + [_entry(section, f.name, cls, None) for f in dataclasses.fields(cls)] + [""]
    lines += [f"`{section}.name` picks the plug-in; a key it does not have is an error. Plug-ins: "
              f"{', '.join(f'`{n}`' for n in options)}.", ""]
    seen: dict[str, list[str]] = {}
    for name, cls in options.items():
        for f in dataclasses.fields(cls):
            seen.setdefault(f.name, []).append(name)
    for key, owners in seen.items():
        cls = options[owners[0]]
        lines.append(_entry(section, key, cls, None if len(owners) == len(options) else owners))
    return lines + [""]


def render(schema: Schema) -> str:
    """The marked section of docs/configuration.md, markers included."""
    lines = [BEGIN, "<!-- generated from the config dataclasses by `python -m decoupled.reference`; "
             "edit the field comments, not this -->", ""]
    for f in dataclasses.fields(schema.job):
        lines += _section(schema, f.name)
    return "\n".join(lines).rstrip() + "\n" + END


def spliced(schema: Schema, text: str) -> str:
    """`text` with its marked section replaced by the current reference (appended when it has none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + render(schema) + rest.split(END, 1)[1]
    return text + ("\n" if text and not text.endswith("\n") else "") + render(schema) + "\n"
