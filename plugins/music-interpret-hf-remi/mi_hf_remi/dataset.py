"""The songs the ``hf_remi`` adapter reads: a folder of MMT notes files (``<name>.npy`` or
``<name>.csv``: beat, position, pitch, duration, program), with ``names.txt`` and
``{train,valid,test}-names.txt`` lists and an optional ``sources.json``, in the folder or
its ``notes/`` subfolder (the layout of ``data/base/bach_notes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from music_interpret.plugin import SPLITS, SongDataset, UserError

NOTE_COLUMNS = 5


class NotesFolder(SongDataset):
    """One split of a notes folder; a song is its int64 notes array (N, 5)."""

    def __init__(self, path: Path, split: str | None = None) -> None:
        given = Path(path)
        if not given.is_dir():
            raise UserError(f"dataset folder {given} does not exist or is not a folder")
        self.notes_dir = given / "notes" if (given / "notes").is_dir() else given
        search = [self.notes_dir, self.notes_dir.parent]
        if split not in (None, *SPLITS):
            raise UserError(f"unknown split {split!r} for dataset {given}: use {'/'.join(SPLITS)}")
        self.split = None if split in (None, "all") else split
        list_name = "names.txt" if self.split is None else f"{self.split}-names.txt"
        listed = next((d / list_name for d in search if (d / list_name).is_file()), None)
        if listed is not None:
            names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
        elif self.split is None:
            names = sorted({p.stem for p in self.notes_dir.iterdir() if p.suffix in (".npy", ".csv")})
        else:
            raise UserError(f"split list {list_name} not found in {self.notes_dir} or its parent")
        if not names:
            raise UserError(f"dataset {self.notes_dir} has no songs")
        self.names = tuple(names)
        sources = next((d / "sources.json" for d in search if (d / "sources.json").is_file()), None)
        self._sources: dict[str, Any] = {}
        if sources is not None:
            data = json.loads(sources.read_text(encoding="utf-8"))
            songs = data.get("songs", data) if isinstance(data, dict) else {}
            self._sources = songs if isinstance(songs, dict) else {}

    @property
    def location(self) -> Path:
        """The notes folder."""
        return self.notes_dir

    def path(self, name: str) -> Path:
        """The notes file of ``name`` (``.npy`` preferred)."""
        if name not in self.names:
            raise UserError(f"song {name!r} is not in dataset {self.notes_dir} (split {self.split or 'all'})")
        for suffix in (".npy", ".csv"):
            if (self.notes_dir / f"{name}{suffix}").is_file():
                return self.notes_dir / f"{name}{suffix}"
        raise UserError(f"{self.notes_dir}: no notes file for song {name!r}")

    def read(self, name: str) -> np.ndarray:
        """The song's notes (N, 5) int64, sorted by onset."""
        path = self.path(name)
        try:
            notes = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
                     else np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read notes: {exc}") from None
        notes = np.asarray(notes, np.int64).reshape(-1, NOTE_COLUMNS) if notes.size else \
            np.zeros((0, NOTE_COLUMNS), np.int64)
        if notes.ndim != 2 or notes.shape[1] != NOTE_COLUMNS:
            raise UserError(f"{path}: notes must have {NOTE_COLUMNS} columns")
        return notes[np.lexsort((notes[:, 2], notes[:, 1], notes[:, 0]))]

    def _info(self, name: str) -> dict[str, Any]:
        info = self._sources.get(name)
        return info if isinstance(info, dict) else {}

    def source(self, name: str) -> str:
        """The corpus file ``sources.json`` records, else the notes file."""
        return str(self._info(name).get("corpus_path") or self.path(name))

    def meters(self, name: str) -> list[tuple[float, int, int]] | None:
        """Time signatures ``sources.json`` records for the song."""
        meters = self._info(name).get("meters")
        return [(float(b), int(n), int(d)) for b, n, d in meters] if meters else None
