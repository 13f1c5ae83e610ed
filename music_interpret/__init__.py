"""Music Interpret: interpretability of symbolic-music transformers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_activations"]


def __getattr__(name: str) -> Any:
    """Heavy entry points load on first use, so ``import music_interpret`` stays fast."""
    if name == "open_activations":
        from .activations import open_activations

        return open_activations
    raise AttributeError(f"module 'music_interpret' has no attribute {name!r}")
