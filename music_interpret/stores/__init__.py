"""Activation stores: the built-in ``netcdf`` store, and :func:`open_store`, the one way
generic code opens a store folder (through the store plugins' door)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..interfaces import StoreReader
    from ..plugins import PluginRegistry


def is_store(path: str | Path, registry: PluginRegistry | None = None) -> bool:
    """Whether an installed store plugin recognizes ``path`` as one of its stores."""
    from ..plugins import get_registry

    registry = registry or get_registry()
    return any(registry.get("activation_store", n).recognizes(Path(path))
               for n in registry.names("activation_store"))


def open_store(path: str | Path, *, verify: bool = False,
               registry: PluginRegistry | None = None) -> StoreReader:
    """The checked store at ``path``, opened by the installed store plugin that recognizes it
    (the default store reports what is wrong with a folder none recognizes).

    ``verify`` also compares every shard with the checksum recorded when it was written.
    """
    from ..config import DEFAULT_STORE
    from ..plugins import get_registry

    registry = registry or get_registry()
    path = Path(path)
    names = registry.names("activation_store")
    chosen = next((n for n in [DEFAULT_STORE, *names] if n in names
                   and registry.get("activation_store", n).recognizes(path)), DEFAULT_STORE)
    cls = registry.get("activation_store", chosen)
    return cls(cls.Config()).open(path, verify=verify)
