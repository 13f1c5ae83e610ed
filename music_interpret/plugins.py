"""Plugin discovery on pluggy: entry points of group ``music_interpret``.

Built-ins are declared as entry points of the ``music-interpret`` distribution
itself, so they travel the same road as third-party packages. Each entry point
is loaded, registered and asked for its classes on its own: one broken plugin
is recorded as failed (with its error) and the others still load. Order:
built-ins first, then third-party distributions by name; when two plugins of
one kind share a name, the first keeps it and the later one is reported failed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import UserError
from .interfaces import Plugin

DISABLE_ENV = "MUSIC_INTERPRET_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "music-interpret"

REGISTRATION_HOOKS = {
    "mi_model_adapters": "model_adapter",
    "mi_activation_stores": "activation_store",
    "mi_dictionary_learners": "dictionary_learner",
    "mi_analyzers": "analyzer",
    "mi_stages": "stage",
}


@dataclass
class PluginInfo:
    """One row of ``python -m music_interpret plugins``."""

    kind: str
    name: str
    description: str
    distribution: str
    version: str
    entry_point: str
    status: str = "loaded"
    error: str | None = None
    cls: type | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (without the class object)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cls"}


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_class(cls: Any, kind: str) -> str | None:
    """Why ``cls`` is not a valid plugin class of ``kind`` (None when it is)."""
    if not isinstance(cls, type) or not issubclass(cls, Plugin):
        return f"{cls!r} is not a music_interpret plugin class"
    if cls.kind != kind:
        return f"{cls.__name__} is a {cls.kind or 'plugin of no kind'}, registered as {kind}"
    if not isinstance(cls.name, str) or not cls.name.strip():
        return f"{cls.__name__} has no name"
    if not isinstance(cls.description, str) or not cls.description.strip():
        return f"{cls.__name__} has no description"
    if "\n" in cls.description.strip():
        return f"{cls.__name__}.description must be one line"
    if not dataclasses.is_dataclass(cls.Config):
        return f"{cls.__name__}.Config is not a dataclass"
    return None


class PluginRegistry:
    """All plugins of one process: pluggy manager plus a table of classes by kind and name."""

    def __init__(self, autoload: bool | None = None, extra: Iterable[ModuleType] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self._classes: dict[tuple[str, str], PluginInfo] = {}
        if autoload is None:
            autoload = not os.environ.get(DISABLE_ENV)
        self._load_entry_points(third_party=autoload)
        for module in extra:
            self._register(module, module.__name__, "(in process)", "", module.__name__)

    @property
    def hook(self) -> Any:
        """Lifecycle hooks (``mi_stage_start`` ...)."""
        return self.pm.hook

    # -- loading ---------------------------------------------------------
    def _load_entry_points(self, third_party: bool) -> None:
        eps = sorted(
            metadata.entry_points(group=hookspecs.PROJECT),
            key=lambda ep: (
                _normalise(ep.dist.name if ep.dist else "") != BUILTIN_DIST,
                _normalise(ep.dist.name if ep.dist else ""),
                ep.name,
            ),
        )
        seen: set[tuple[str, str]] = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if (dist, ep.name) in seen:  # same distribution visible twice on sys.path
                continue
            seen.add((dist, ep.name))
            if not third_party and _normalise(dist) != BUILTIN_DIST:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import error must be reported, not raised
                self.infos.append(
                    PluginInfo("?", ep.name, f"entry point {ep.value}", dist, version, ep.name,
                               "failed", _error_text(exc))
                )
                continue
            self._register(module, f"{dist}:{ep.name}", dist, version, ep.name)

    def _register(self, module: Any, plugin_name: str, dist: str, version: str, ep: str) -> None:
        try:
            self.pm.register(module, name=plugin_name)
        except Exception as exc:  # noqa: BLE001 - a bad hookimpl must not stop the others
            self.infos.append(PluginInfo("?", ep, f"module {getattr(module, '__name__', module)}",
                                         dist, version, ep, "failed", _error_text(exc)))
            return
        for hook_name, kind in REGISTRATION_HOOKS.items():
            impl = getattr(module, hook_name, None)
            if impl is None:
                continue
            try:
                classes = list(impl() or [])
            except Exception as exc:  # noqa: BLE001
                self.infos.append(PluginInfo(kind, ep, f"{hook_name}() of {plugin_name}",
                                             dist, version, ep, "failed", _error_text(exc)))
                continue
            for cls in classes:
                self._add_class(cls, kind, dist, version, ep)

    def _add_class(self, cls: Any, kind: str, dist: str, version: str, ep: str) -> None:
        problem = _check_class(cls, kind)
        name = getattr(cls, "name", "") or getattr(cls, "__name__", "?")
        description = str(getattr(cls, "description", "") or "").strip()
        info = PluginInfo(kind, str(name), description, dist, version, ep, cls=cls)
        if problem is None and (kind, name) in self._classes:
            other = self._classes[(kind, name)]
            problem = f"duplicate {kind} name {name!r}: already registered by {other.distribution}"
        if problem:
            info.status, info.error, info.cls = "failed", problem, None
        else:
            self._classes[(kind, name)] = info
        self.infos.append(info)

    # -- queries ---------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Names of the loaded plugins of ``kind``, sorted."""
        return sorted(n for k, n in self._classes if k == kind)

    def find(self, kind: str, name: str) -> type | None:
        """The class registered as ``name`` for ``kind``, or None."""
        info = self._classes.get((kind, name))
        return info.cls if info else None

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name``; UserError with a suggestion otherwise."""
        cls = self.find(kind, name)
        if cls is None:
            raise UserError(unknown_plugin_message(self, kind, name))
        return cls

    def failed(self) -> list[PluginInfo]:
        """Plugins that could not be loaded."""
        return [i for i in self.infos if i.status != "loaded"]


def unknown_plugin_message(registry: PluginRegistry, kind: str, name: str) -> str:
    """``unknown analyzer 'x' (did you mean 'y'?; available: ...)``."""
    available = registry.names(kind)
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(available) if available else "none installed"
    failed = [i.name for i in registry.failed() if i.name == name]
    extra = " (a plugin of that name failed to load: see `python -m music_interpret plugins`)" if failed else ""
    return f"unknown {kind.replace('_', ' ')} {name!r} ({hint}available: {listed}){extra}"


_REGISTRY: PluginRegistry | None = None


def get_registry(refresh: bool = False) -> PluginRegistry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = PluginRegistry()
    return _REGISTRY

