"""Entry-point module: registers the ``note_stats`` stage."""

from __future__ import annotations

from music_interpret.plugin import hookimpl


@hookimpl
def mi_stages() -> list[type]:
    from .stage import NoteStats

    return [NoteStats]
