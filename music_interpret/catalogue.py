"""The committed catalogue of known plugins (and, later, promoted dictionaries), shipped as
package data (``music_interpret/data/plugins.yaml``; ``registry/plugins.yaml`` links to it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import UserError
from .interfaces import KINDS

ENV = "MUSIC_INTERPRET_REGISTRY"
REQUIRED = ("kind", "name", "distribution", "description")


def default_path() -> Path | None:
    """``$MUSIC_INTERPRET_REGISTRY``, or None for the catalogue shipped in the package
    (``music_interpret/data/plugins.yaml``; the repository's ``registry/plugins.yaml``
    links to it)."""
    env = os.environ.get(ENV)
    return Path(env) if env else None


def load_catalogue(path: Path | None = None) -> list[dict[str, Any]]:
    """Entries of the catalogue, checked: each has kind, name, distribution, description."""
    path = Path(path) if path else default_path()
    if path is None:
        from importlib.resources import as_file, files

        with as_file(files("music_interpret") / "data" / "plugins.yaml") as shipped:
            return load_catalogue(Path(shipped))
    if not path.exists():
        raise UserError(f"{path}: catalogue not found (pass --path or set {ENV})")
    data = load_yaml(path)
    entries = data.get("plugins")
    if not isinstance(entries, list):
        raise UserError(f"{path}: key 'plugins' must be a list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: plugins[{i}] must be a mapping")
        missing = [k for k in REQUIRED if not entry.get(k)]
        if missing:
            raise UserError(f"{path}: plugins[{i}] lacks {', '.join(missing)}")
        if entry["kind"] not in KINDS:
            raise UserError(f"{path}: plugins[{i}].kind: {entry['kind']!r} is not one of {', '.join(KINDS)}")
        out.append({k: entry[k] for k in REQUIRED} | {k: v for k, v in entry.items() if k not in REQUIRED})
    return out
