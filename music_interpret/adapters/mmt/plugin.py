"""Entry point ``mmt`` of group ``music_interpret``: registers :class:`MMTAdapter`."""

from __future__ import annotations

from ...hookspecs import hookimpl


@hookimpl
def mi_model_adapters() -> list[type]:
    """The MMT model adapter."""
    from .adapter import MMTAdapter

    return [MMTAdapter]
