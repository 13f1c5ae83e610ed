"""Cover whole songs with model-sized input windows (nothing is truncated).

MMT's own dataset cuts a song at ``max_seq_len`` codes and drops notes at or after
``max_beat``. For analysis we want every note, so a long song is split into
windows that each look like a song MMT saw in training:

``start-of-song, <instrument rows of the whole song>, start-of-notes, notes[a:b], end-of-song``

* Each window repeats the song's header (start-of-song, one row per instrument,
  start-of-notes) and ends with end-of-song; ``notes[a:b]`` is a slice of the
  song's notes.
* Beats: a window whose notes all lie before ``max_beat`` keeps the song's beats
  (so a song that fits in one window is encoded exactly as MMT encodes it). Any
  other window is shifted down to start at the beat of its first note, as MMT's
  training augmentation does when it picks a random start beat. The stored
  ``beat`` coordinate is always the song's own beat.
* Stride: the next window starts half a window of notes later (``stride`` notes if
  given), so every note after the first window has at least half a window of
  left context.
* Ownership: every token of the song belongs to exactly one window. The header
  belongs to the first window; a note belongs to the first window that contains it
  (where it has the most left context); end-of-song belongs to the last window.
  Windows that would own nothing are not produced.
* ``seq_pos`` of a token is its position in the model input of the window that
  owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UserError
from . import representation as rep


@dataclass(frozen=True)
class SongTokens:
    """A whole song as one token sequence with song-level beats.

    ``codes`` (T, 6) are MMT codes (beat codes may exceed a model's ``max_beat``);
    ``note`` (T,) is the row of each note token in ``notes`` (-1 on other tokens);
    ``notes`` are the notes MMT's encoding keeps (mapped program), in song order;
    ``dropped`` counts notes whose program MMT's instrument table does not map.
    """

    codes: np.ndarray
    note: np.ndarray
    notes: np.ndarray
    dropped: int

    @property
    def header_len(self) -> int:
        """Start-of-song, instrument rows and start-of-notes."""
        return len(self.codes) - len(self.notes) - 1


@dataclass(frozen=True)
class Window:
    """One model input: ``codes`` (L, 6), the song token index of each row, and ownership."""

    codes: np.ndarray
    token: np.ndarray
    owned: np.ndarray

    @property
    def seq_pos(self) -> np.ndarray:
        """Model input positions of the owned rows."""
        return np.flatnonzero(self.owned)


def tokenize_song(notes: np.ndarray) -> SongTokens:
    """Encode a song's notes (N, 5) into one token sequence, beats unlimited."""
    notes = np.asarray(notes, dtype=np.int64)
    mapped = rep.PROGRAM_TO_INSTRUMENT[notes[:, 4]] > 0 if len(notes) else np.zeros(0, bool)
    kept = notes[mapped]
    # encode with beats shifted into range, then restore song-level beat codes
    codes = rep.encode_notes(_with_beats(kept, np.zeros(len(kept), np.int64)))
    header = len(codes) - len(kept) - 1
    codes[header : header + len(kept), 1] = kept[:, 0] + 1
    note = np.full(len(codes), -1, np.int64)
    note[header : header + len(kept)] = np.arange(len(kept))
    return SongTokens(codes, note, kept, int(len(notes) - len(kept)))


def _with_beats(notes: np.ndarray, beats: np.ndarray) -> np.ndarray:
    out = notes.copy()
    out[:, 0] = beats
    return out


def song_windows(
    song: SongTokens, max_seq_len: int, max_beat: int, stride: int | None = None
) -> list[Window]:
    """Windows covering every token of ``song`` exactly once (see the module docstring)."""
    header = song.header_len
    n = len(song.notes)
    capacity = max_seq_len - header - 1
    if capacity < 1:
        raise UserError(f"a song with {header - 2} instruments does not fit max_seq_len={max_seq_len}")
    if stride is not None and stride < 1:
        raise UserError(f"window stride must be at least 1 note, got {stride}")
    if n == 0:
        return [Window(song.codes.copy(), np.arange(len(song.codes)), np.ones(len(song.codes), bool))]
    beats = song.notes[:, 0]
    head = song.codes[:header]
    eos = song.codes[-1:]
    out: list[Window] = []
    owned_until = 0  # notes [0, owned_until) already belong to a window
    a = 0
    while True:
        b = max(a + 1, min(n, a + capacity, int(np.searchsorted(beats, beats[a] + max_beat))))
        first, last = not out, b == n
        if first or b > owned_until:
            body = song.codes[header + a : header + b].copy()
            if beats[b - 1] >= max_beat:
                body[:, 1] -= beats[a]  # shift down to the window's first note
            codes = np.concatenate((head, body, eos))
            token = np.concatenate((np.arange(header), header + np.arange(a, b), [len(song.codes) - 1]))
            owned = np.zeros(len(codes), bool)
            owned[:header] = first
            owned[header + max(owned_until - a, 0) : header + (b - a)] = True
            owned[-1] = last
            out.append(Window(codes, token, owned))
            owned_until = b
        if last:
            return out
        step = stride if stride is not None else max(1, (b - a) // 2)
        a = min(a + step, b)  # never skip past the first note not yet owned


def pad_codes(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad code arrays (T_i, 6) into one batch: (codes (B, T, 6) int64, mask (B, T) bool)."""
    t = max(len(s) for s in seqs)
    codes = np.zeros((len(seqs), t, 6), np.int64)
    mask = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        codes[i, : len(s)] = s
        mask[i, : len(s)] = True
    return codes, mask
