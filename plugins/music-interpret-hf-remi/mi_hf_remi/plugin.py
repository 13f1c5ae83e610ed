"""Entry point ``hf_remi`` of group ``music_interpret``: registers :class:`HFRemiAdapter`."""

from __future__ import annotations

from music_interpret.plugin import hookimpl


@hookimpl
def mi_model_adapters() -> list[type]:
    """The HuggingFace-over-REMI model adapter (transformers and miditok load on first use)."""
    from .adapter import HFRemiAdapter

    return [HFRemiAdapter]
