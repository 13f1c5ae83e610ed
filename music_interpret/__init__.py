"""Music Interpret: interpretability of symbolic-music transformers.

The Python API (see :mod:`music_interpret.api`): :func:`run`, :func:`load_model`,
:func:`load_dictionary`, :func:`encode` and :func:`open_activations`.
"""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["__version__", "encode", "load_dictionary", "load_model", "open_activations", "run"]
_API = {"encode", "load_dictionary", "load_model", "run"}


def __getattr__(name: str) -> Any:
    """Heavy entry points load on first use, so ``import music_interpret`` stays fast."""
    if name == "open_activations":
        from .activations import open_activations

        return open_activations
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'music_interpret' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
