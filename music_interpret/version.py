"""The installed version of music-interpret (``0+unknown`` in an uninstalled source tree)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("music-interpret")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
