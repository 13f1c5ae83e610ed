"""``pipeline.yaml``: strict, typed loading into dataclasses.

Every problem is collected as one line naming its YAML path
(``train.learner.l1_coeff: expected a number, got 'abc'``) so that ``validate``
can show them all at once. Field metadata understood here:

- ``{"input": True}``: a path that must exist;
- ``{"plugin": KIND}``: a plugin reference, written as a name or as a mapping
  ``{name: ..., <options of the plugin's Config>}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError
from .yamlio import (  # noqa: F401 - re-exported: reading pipeline.yaml and --set
    MAX_YAML_VALUES,
    _kind,
    _path_text,
    apply_override,
    check_expanded_size,
    load_yaml,
    parse_scalar,
)

if typing.TYPE_CHECKING:
    from .plugins import PluginRegistry

STANDARD_STAGES = ("extract", "preprocess", "train", "analyze", "report")
#: the model adapter and activation store a pipeline uses unless it names others
DEFAULT_ADAPTER = "mmt"
DEFAULT_STORE = "netcdf"
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu|hpu|npu|mtia)(:\d+)?)$")


@dataclass
class PluginRef:
    """A plugin chosen in the YAML, with its validated ``Config`` instance."""

    kind: str
    name: str
    config: Any

    def build(self, registry: PluginRegistry) -> Any:
        """Instantiate the plugin."""
        return registry.get(self.kind, self.name)(self.config)


class Converter:
    """Converts raw YAML values to typed values, collecting one line per problem."""

    def __init__(self, registry: PluginRegistry | None, base_dir: Path) -> None:
        self.registry = registry
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}" if where else message)

    # -- dataclasses -------------------------------------------------------
    def build(self, cls: type, raw: Any, where: str) -> Any:
        """Instantiate dataclass ``cls`` from mapping ``raw`` (None if it failed)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(where, f"expected a mapping, got {_kind(raw)}")
            return None
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in raw:
            if key not in fields:
                self.error(_join(where, str(key)), "unknown key" + _suggest(str(key), fields))
        values: dict[str, Any] = {}
        ok = True
        for name, f in fields.items():
            sub = _join(where, name)
            if name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.error(sub, "required key is missing")
                    ok = False
                elif f.metadata.get("plugin"):  # a default given by name(s) is resolved too
                    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                    before = len(self.errors)
                    values[name] = self.convert(default, hints[name], sub, f.metadata)
                    ok = ok and len(self.errors) == before
                elif isinstance(f.default, Path):
                    values[name] = self._path(f.default)
                    if f.metadata.get("input"):
                        self._check_input(values[name], sub, f.metadata["input"])
                continue
            before = len(self.errors)
            value = self.convert(raw[name], hints[name], sub, f.metadata)
            if len(self.errors) == before:
                values[name] = value
            else:
                ok = False
        if not ok:
            return None
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # __post_init__ checks of a plugin config
            self.error(where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None

    # -- single values -----------------------------------------------------
    def convert(self, value: Any, tp: Any, where: str, meta: Any = None) -> Any:
        """Convert ``value`` to type ``tp``; on a problem record it and return None."""
        meta = meta or {}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if meta.get("plugin"):
            if origin is list:
                if not isinstance(value, list):
                    self.error(where, f"expected a list of plugins, got {_kind(value)}")
                    return None
                return [self.plugin_ref(v, meta["plugin"], f"{where}[{i}]") for i, v in enumerate(value)]
            if value is None and type(None) in args:
                return None
            return self.plugin_ref(value, meta["plugin"], where)
        if tp is Any:
            return value
        if origin is typing.Annotated:
            return self.convert(value, args[0], where, meta)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) == 1:
                return self.convert(value, options[0], where, meta)
            for option in options:
                trial = Converter(self.registry, self.base_dir)
                result = trial.convert(value, option, where, meta)
                if not trial.errors:
                    return result
            self.error(where, f"expected {' or '.join(_type_name(o) for o in options)}, got {_kind(value)}")
            return None
        if origin is Literal:
            if isinstance(value, bool) and ("on" if value else "off") in args:
                return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            if value in args and not isinstance(value, bool):
                return value
            self.error(where, f"expected one of {', '.join(map(repr, args))}, got {_kind(value)}"
                       + _suggest(str(value), [str(a) for a in args]))
            return None
        if origin in (list, tuple) or tp in (list, tuple):
            if not isinstance(value, list):
                self.error(where, f"expected a list, got {_kind(value)}")
                return None
            item = args[0] if args else Any
            items = [self.convert(v, item, f"{where}[{i}]", meta) for i, v in enumerate(value)]
            return tuple(items) if (origin or tp) is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                self.error(where, f"expected a mapping, got {_kind(value)}")
                return None
            item = args[1] if len(args) == 2 else Any
            return {str(k): self.convert(v, item, _join(where, str(k)), meta) for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, where)
        return self._scalar(value, tp, where, meta)

    def _scalar(self, value: Any, tp: Any, where: str, meta: Any) -> Any:
        if tp is bool:
            if isinstance(value, bool):
                return value
            self.error(where, f"expected true or false, got {_kind(value)}")
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.error(where, f"expected an integer, got {_kind(value)}")
        elif tp is float:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric or (isinstance(value, str) and _FLOAT_RE.match(value.strip())):
                number = float(value)
                if math.isfinite(number):
                    return number
                self.error(where, f"expected a finite number, got {value!r}")
                return None
            self.error(where, f"expected a number, got {_kind(value)}")
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            self.error(where, f"expected a string, got {_kind(value)}")
        elif tp is Path:
            if not isinstance(value, str) or not value:
                self.error(where, f"expected a path, got {_kind(value)}")
                return None
            path = self._path(value)
            if meta.get("input"):
                self._check_input(path, where, meta["input"])
            return path
        else:
            if isinstance(value, tp):
                return value
            self.error(where, f"expected {_type_name(tp)}, got {_kind(value)}")
        return None

    def _path(self, value: Any) -> Path:
        path = Path(str(value)).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def _check_input(self, path: Path, where: str, kind: Any = True) -> None:
        if not path.exists():
            self.error(where, f"no such file or directory: {path}")
        elif kind == "dir" and not path.is_dir():
            self.error(where, f"{path} is a file; expected a folder")

    # -- plugins -----------------------------------------------------------
    def plugin_ref(self, value: Any, kind: str, where: str) -> PluginRef | None:
        """``name`` or ``{name: ..., option: ...}`` -> PluginRef with a validated config."""
        if isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, dict):
            if "name" not in value:
                self.error(_join(where, "name"), f"required key is missing (which {kind.replace('_', ' ')})")
                return None
            name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
            if not isinstance(name, str):
                self.error(_join(where, "name"), f"expected a plugin name, got {_kind(name)}")
                return None
        else:
            self.error(where, f"expected a plugin name or a mapping with 'name', got {_kind(value)}")
            return None
        if self.registry is None:
            return PluginRef(kind, name, options)
        from .plugins import unknown_plugin_message

        cls = self.registry.find(kind, name)
        if cls is None:
            self.error(where if isinstance(value, str) else _join(where, "name"),
                       unknown_plugin_message(self.registry, kind, name))
            return None
        config = self.build(cls.Config, options, where)
        return None if config is None else PluginRef(kind, name, config)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             Path: "a path", list: "a list", dict: "a mapping"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in names:
        return names[origin]
    return getattr(tp, "__name__", str(tp))


# -- the pipeline schema ---------------------------------------------------------------------

@dataclass
class ModelSection:
    """Which trained model to analyse."""

    path: Path = field(metadata={"input": "dir"})
    adapter: PluginRef = field(default=DEFAULT_ADAPTER, metadata={"plugin": "model_adapter"})  # type: ignore[assignment]


@dataclass
class DataSection:
    """Which songs to run the model on: a notes dataset, or a folder of music files that
    the model adapter converts once (``format``: ``midi``, ``musicxml``, or ``auto``, which
    picks by the files' extensions and takes a notes dataset as it is)."""

    path: Path = field(metadata={"input": "dir"})
    split: Literal["all", "train", "valid", "test"] = "all"
    format: Literal["notes", "midi", "musicxml", "auto"] = "notes"
    #: the folder the user named, once the run has converted it (``path`` is then the dataset)
    converted_from: Path | None = field(default=None, init=False)


@dataclass
class PipelineHeader:
    """Top-level keys of ``pipeline.yaml`` other than the stage sections."""

    run: str = "default"
    output_dir: Path = Path("reports")
    stages: list[str] = field(default_factory=lambda: list(STANDARD_STAGES))
    seed: int = 0
    device: str = "auto"
    model: ModelSection | None = None
    data: DataSection | None = None


@dataclass
class Pipeline:
    """A validated pipeline: header, one config per stage, and where it came from."""

    header: PipelineHeader
    stage_configs: dict[str, Any]
    source: Path | None
    raw: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.header.output_dir / self.header.run


def parse_pipeline(
    raw: dict[str, Any],
    registry: PluginRegistry,
    base_dir: Path,
    source: Path | None = None,
) -> Pipeline:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    conv = Converter(registry, base_dir)
    stage_names = set(registry.names("stage"))
    header_fields = [f.name for f in dataclasses.fields(PipelineHeader)]
    header_raw = {k: v for k, v in raw.items() if k in header_fields}
    unavailable: set[str] = set()
    for key in raw:
        if key in header_fields or key in stage_names:
            continue
        if key in STANDARD_STAGES:
            unavailable.add(key)
            conv.error(key, _unavailable(key))
        else:
            conv.error(str(key), "unknown key" + _suggest(str(key), [*header_fields, *stage_names]))
    header = conv.build(PipelineHeader, header_raw, "")
    if header is not None and not _RUN_NAME_RE.match(header.run):
        conv.error("run", f"{header.run!r} is not a valid run name (letters, digits, '_', '-', '.')")
    if header is not None:
        problem = device_problem(header.device)
        if problem:
            conv.error("device", problem)
    stages = raw.get("stages", list(STANDARD_STAGES))
    stages = [s for s in stages if isinstance(s, str)] if isinstance(stages, list) else []
    for i, name in enumerate(stages):
        if name in stage_names:
            if stages.index(name) != i:
                conv.error(f"stages[{i}]", f"stage {name!r} is listed twice")
        elif name in unavailable:
            continue
        elif name in STANDARD_STAGES:
            unavailable.add(name)
            conv.error(f"stages[{i}]", _unavailable(name))
        else:
            conv.error(f"stages[{i}]", f"unknown stage {name!r}"
                       + _suggest(name, stage_names | set(STANDARD_STAGES)))
    configs: dict[str, Any] = {}
    for name in sorted(stage_names):
        if name not in raw and name not in stages:
            continue
        cls = registry.find("stage", name)
        configs[name] = conv.build(cls.Config, raw.get(name), name)
        if header is not None and name in stages:
            for needed in getattr(cls, "requires", ()):
                if getattr(header, needed, None) is None and needed not in _error_keys(conv):
                    conv.error(needed, f"required by stage {name!r} but missing")
    if conv.errors:
        problems = _unique(conv.errors)
        only_unavailable = all("is not available in this installation" in p for p in problems)
        raise ConfigError(problems, exit_code=3 if only_unavailable else 2)
    assert header is not None
    header.output_dir = header.output_dir.resolve()
    return Pipeline(header, configs, source, raw)


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here (None when it can); imports torch only for accelerators."""
    if not _DEVICE_RE.match(device):
        return (f"unknown device {device!r}" + _suggest(device, ["auto", "cpu", "cuda", "cuda:0", "mps"])
                + " (auto, cpu, cuda, cuda:N, mps, xpu)")
    kind = device.split(":")[0]
    if kind in ("auto", "cpu", "meta"):
        return None
    import torch

    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", lambda: False)()
    if not available:
        return f"device {device!r} is not available on this machine (use auto or cpu)"
    count = getattr(backend, "device_count", lambda: 1)()
    if ":" in device and int(device.split(":")[1]) >= count:
        return f"device {device!r} does not exist: this machine has {count} {kind} device(s)"
    return None


def _error_keys(conv: Converter) -> set[str]:
    """Top-level keys that already have an error (to avoid repeating them)."""
    return {e.split(":", 1)[0].split(".", 1)[0] for e in conv.errors}


def _unavailable(stage: str) -> str:
    return (f"stage {stage!r} is not available in this installation: no installed plugin provides it "
            "(`python -m music_interpret plugins` lists what is installed)")


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def load_pipeline(
    path: Path,
    registry: PluginRegistry,
    overrides: list[str] | tuple[str, ...] = (),
) -> Pipeline:
    """Read, override and validate ``pipeline.yaml``; paths resolve against its folder."""
    path = Path(path)
    raw = load_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_pipeline(raw, registry, path.resolve().parent, source=path.resolve())
