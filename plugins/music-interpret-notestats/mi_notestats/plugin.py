"""Entry-point module: registers the ``note_stats`` stage and the ``note_share`` analyzer."""

from __future__ import annotations

from music_interpret.plugin import hookimpl


@hookimpl
def mi_stages() -> list[type]:
    from .stage import NoteStats

    return [NoteStats]


@hookimpl
def mi_analyzers() -> list[type]:
    from .analyzer import NoteShare

    return [NoteShare]
