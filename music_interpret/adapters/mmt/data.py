"""The data side of the ``mmt`` adapter's door: datasets, tokens with coordinates, windows,
padding, the event vocabulary, notes rendered back, transposition.

A song is its notes array (N, 5): beat, position, pitch, duration, program
(:mod:`.dataset`). Everything here but :meth:`MMTData.song_windows` and
:meth:`MMTData.check_dataset` works without loading the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...doors import COORDINATES, EventVocabulary, NoteTable, SongTokens, Window

if TYPE_CHECKING:
    from ...interfaces import Batch, SongDataset
    from .dataset import NoteDataset

MIDI_MAX = 127


class MMTData:
    """Data methods of :class:`~music_interpret.adapters.mmt.adapter.MMTAdapter`."""

    # provided by the adapter
    max_seq_len: int
    max_beat: int

    def check_encoding(self, encoding: Mapping[str, Any], source: str | Path) -> None:
        raise NotImplementedError

    def input_embeddings(self) -> Any:
        raise NotImplementedError

    # -- datasets ----------------------------------------------------------------------

    def open_dataset(self, path: Path, split: str | None = None) -> NoteDataset:
        """MMT's layout or the seed layout (see :func:`.dataset.open_dataset`)."""
        from .dataset import open_dataset

        return open_dataset(path, split)

    def data_format(self, path: Path, format: str) -> str:
        """``data.format`` for the folder ``path`` (see :func:`.data_import.data_format`)."""
        from .data_import import data_format

        return data_format(path, format)

    def import_data(self, path: Path, format: str, cache_dir: Path) -> Path:
        """The music files of ``path`` as a cached notes dataset (see :mod:`.data_import`)."""
        from .data_import import import_data

        return import_data(path, format, cache_dir)

    def check_dataset(self, dataset: SongDataset) -> None:
        """Refuse a dataset whose ``encoding.json`` disagrees with the checkpoint's vocabularies."""
        load = getattr(dataset, "load_encoding", None)
        encoding = load() if load is not None else None
        if encoding is not None:
            self.check_encoding(encoding, getattr(dataset, "encoding_path", "encoding.json"))

    # -- tokens ------------------------------------------------------------------------

    def event_vocabulary(self) -> EventVocabulary:
        """MMT's five events, its 64 instruments and its 32 known durations."""
        from . import representation as rep

        return EventVocabulary(rep.TYPE_NAMES, rep.NOTE, rep.EOS, rep.INSTRUMENT_NAMES,
                               rep.KNOWN_DURATIONS)

    def tokenize(self, song: np.ndarray) -> SongTokens:
        """The song as MMT codes (beats unlimited, see :mod:`.windows`) with coordinates; a
        note token's ``program`` is the note's own program (the code gives its instrument's)."""
        from .representation import token_metadata
        from .windows import tokenize_song

        tokens = tokenize_song(song)
        meta = token_metadata(tokens.codes)
        coords = {k: np.asarray(meta[k], np.int64) for k in COORDINATES if k != "program"}
        program = np.full(len(tokens.codes), -1, np.int64)
        note = tokens.note
        program[note >= 0] = tokens.notes[note[note >= 0], 4]
        coords["program"] = np.where(program >= 0, program, meta["program"])
        return SongTokens(tokens.codes, coords, tokens.dropped, tokens)

    def song_windows(self, tokens: SongTokens, stride: int | None = None) -> list[Window]:
        """Windows of ``start-of-song, instruments, start-of-notes, notes[a:b], end-of-song``
        (see :mod:`.windows`); ``stride`` in notes (default: half a window)."""
        from .windows import song_windows

        wins = song_windows(tokens.song, self.max_seq_len, self.max_beat, stride)
        return [Window(w.codes, w.token, w.owned) for w in wins]

    def pad(self, inputs: Sequence[np.ndarray]) -> Batch:
        """Codes (L_i, 6) zero-padded into a batch."""
        import torch

        from ...interfaces import Batch
        from .windows import pad_codes

        codes, mask = pad_codes(list(inputs))
        return Batch(torch.from_numpy(codes), torch.from_numpy(mask))

    # -- notes -------------------------------------------------------------------------

    def render_notes(self, tokens: SongTokens) -> NoteTable:
        """The notes MMT's encoding keeps, with their own durations and programs, named by
        MMT's instrument of the program."""
        from .representation import PROGRAM_INSTRUMENT_MAP

        song = tokens.song
        notes = np.asarray(song.notes, np.int64).reshape(-1, 5)
        names = np.asarray([PROGRAM_INSTRUMENT_MAP.get(int(p)) or f"program-{int(p)}"
                            for p in notes[:, 4]], dtype=object)
        return NoteTable(np.flatnonzero(np.asarray(song.note) >= 0).astype(np.int64),
                         notes[:, 0], notes[:, 1], notes[:, 2], notes[:, 3], notes[:, 4], names)

    def transpose(self, song: np.ndarray, semitones: int) -> np.ndarray | None:
        """The notes with every pitch moved by ``semitones``; None when one leaves 0-127."""
        notes = np.array(song, dtype=np.int64, copy=True)
        notes[:, 2] += int(semitones)
        if len(notes) and (notes[:, 2].min() < 0 or notes[:, 2].max() > MIDI_MAX):
            return None
        return notes

    def embed_coordinates(self, coords: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """The six field embeddings summed per token (see :mod:`.embedding`)."""
        from .embedding import NOTE_LIMITATION, embed_coords

        names, rows = self.input_embeddings()
        return embed_coords(names, rows, coords), NOTE_LIMITATION

