"""JSON Schema (draft 2020-12) of ``pipeline.yaml``, built from the config dataclasses.

The header (:class:`~music_interpret.config.PipelineHeader`), one section per installed
stage (its ``Config``), and every plugin reference as a name or ``{name: ..., <options
of that plugin's Config>}``, for every plugin installed when it is generated. Editors
with a YAML language server complete and check ``pipeline.yaml`` against it
(``python -m music_interpret schema --out pipeline.schema.json``). The loader stays the
judge: the schema cannot say that a path must exist or that a ``__post_init__`` check
holds.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from .config import _DEVICE_RE, _RUN_NAME_RE, PipelineHeader

DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Builder:
    """Turns annotated dataclasses into schemas, collecting shared ones under ``$defs``."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.defs: dict[str, Any] = {}

    def dataclass(self, cls: type, key: str) -> dict[str, Any]:
        """A ``$ref`` to ``cls``'s object schema (built once, under ``key``)."""
        if key not in self.defs:
            self.defs[key] = {}  # placeholder: recursion stops here
            hints = typing.get_type_hints(cls, include_extras=True)
            props, required = {}, []
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                props[f.name] = self.field(f, hints[f.name])
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    required.append(f.name)
            schema: dict[str, Any] = {"type": "object", "properties": props,
                                      "additionalProperties": False}
            if required:
                schema["required"] = required
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            if doc and not doc.startswith(cls.__name__ + "("):
                schema["description"] = " ".join(doc.split())
            self.defs[key] = schema
        return {"$ref": f"#/$defs/{key}"}

    def field(self, f: dataclasses.Field, tp: Any) -> dict[str, Any]:
        kind = f.metadata.get("plugin")
        if kind:
            one = self.plugin(kind)
            if typing.get_origin(tp) is list:
                out: dict[str, Any] = {"type": "array", "items": one}
            else:
                out = {"anyOf": [one, {"type": "null"}]} if type(None) in typing.get_args(tp) else one
        else:
            out = self.type(tp)
        default = _default(f)
        if default is not dataclasses.MISSING:
            out = {**out, "default": default}
        return out

    def plugin(self, kind: str) -> dict[str, Any]:
        """A plugin of ``kind``: its name, or a mapping with ``name`` and its Config's options."""
        key = f"plugin:{kind}"
        if key not in self.defs:
            self.defs[key] = {}
            names = self.registry.names(kind)
            options = []
            for name in names:
                cls = self.registry.find(kind, name)
                own = f"{kind}:{name}"
                self.dataclass(cls.Config, own)
                config = self.defs.pop(own)  # inlined below, with its name
                options.append({**config, "properties": {"name": {"const": name},
                                                         **config.get("properties", {})},
                                "required": ["name", *config.get("required", [])]})
            self.defs[key] = {"description": f"a {kind.replace('_', ' ')}: its name, or "
                              "{name: ..., <options>}",
                              "anyOf": [{"type": "string", "enum": names}, *options]}
        return {"$ref": f"#/$defs/{key}"}

    def type(self, tp: Any) -> dict[str, Any]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return {}
        if origin is typing.Annotated:
            return self.type(args[0])
        if origin in (Union, types.UnionType):
            options = [self.type(a) for a in args if a is not type(None)]
            if type(None) in args:
                options.append({"type": "null"})
            return options[0] if len(options) == 1 else {"anyOf": options}
        if origin is Literal:
            values = list(args)
            if "on" in values and "off" in values:
                values += [True, False]  # YAML 1.1 reads a bare on/off as a boolean
            return {"enum": values}
        if origin in (list, tuple) or tp in (list, tuple):
            return {"type": "array", **({"items": self.type(args[0])} if args else {})}
        if origin is dict or tp is dict:
            return {"type": "object", **({"additionalProperties": self.type(args[1])}
                                         if len(args) == 2 else {})}
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, tp.__name__)
        simple = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        return {}


def _default(f: dataclasses.Field) -> Any:
    """The field's default as JSON (MISSING when it has none or it cannot be written)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
    except TypeError:
        return dataclasses.MISSING
    return value


def pipeline_schema(registry: Any) -> dict[str, Any]:
    """The JSON Schema of ``pipeline.yaml`` for the plugins in ``registry``."""
    build = _Builder(registry)
    header = build.defs[build.dataclass(PipelineHeader, "PipelineHeader")["$ref"].rsplit("/", 1)[1]]
    props = dict(header["properties"])
    props["run"] = {**props["run"], "pattern": _RUN_NAME_RE.pattern}
    props["device"] = {**props["device"], "pattern": _DEVICE_RE.pattern}
    stages = registry.names("stage")
    props["stages"] = {**props["stages"], "items": {"enum": stages}, "uniqueItems": True}
    for name in stages:
        cls = registry.find("stage", name)
        props[name] = {"anyOf": [build.dataclass(cls.Config, f"stage:{name}"), {"type": "null"}],
                       "description": cls.description}
    del build.defs["PipelineHeader"]
    return {"$schema": DRAFT, "title": "music-interpret pipeline.yaml",
            "description": "A pipeline: run name, model, data, stages and one section per stage.",
            "type": "object", "properties": props, "additionalProperties": False,
            "$defs": dict(sorted(build.defs.items()))}
