"""Data that crosses the plugin doors (contract): a model adapter's event vocabulary,
songs as tokens with musical coordinates, model windows, notes rendered back from tokens,
and the shards of an activation store.

Only numpy is needed (under ``TYPE_CHECKING``); the classes are plain frozen dataclasses,
re-exported by :mod:`music_interpret.interfaces` and :mod:`music_interpret.plugin`.

**Coordinates.** Every token of a song carries the integer coordinates named in
:data:`COORDINATES`, ``-1`` where one does not apply (the pitch of a bar token, say):

* ``event_type``: index into the adapter's :class:`EventVocabulary` ``events``;
* ``beat``: the beat of the token's onset from the song's start;
* ``position``: the onset inside the beat, in twelfths of a beat (``RESOLUTION``);
* ``pitch``: MIDI pitch; ``duration``: in twelfths of a beat;
* ``instrument``: index into the vocabulary's ``instruments`` (0: none);
* ``program``: General MIDI program.

**t+1.** Position t of a model window predicts the window's next row: the ``next.*``
labels of the analyses are the coordinates of the token after t in the same window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import numpy as np

#: the musical coordinates every token carries (-1 where they do not apply)
COORDINATES = ("event_type", "beat", "position", "pitch", "duration", "instrument", "program")
#: what a store records on every token: where it sits (song, model input position, song
#: token, window of the song) and its musical coordinates
STORE_COORDINATES = ("song", "seq_pos", "song_token", "window", *COORDINATES)
#: time steps per beat of ``position`` and ``duration``
RESOLUTION = 12
NOT_APPLICABLE = -1
#: the splits a dataset may be opened with
SPLITS = ("all", "train", "valid", "test")


@dataclass(frozen=True)
class EventVocabulary:
    """What the coordinate ``event_type`` and ``instrument`` codes mean for one adapter.

    ``events``: name of each event type code (MMT: start-of-song, instrument,
    start-of-notes, note, end-of-song; a REMI tokenization: Bar, Position, Pitch, Velocity,
    Duration, ...). ``note``: the event type of the token that carries a note's pitch (the
    token note attributes are computed on). ``end``: the event type of the song's end token,
    if the vocabulary has one (``next.event_type`` after a song's last note). ``instruments``:
    name of each instrument code, code 0 meaning none (``""``). ``durations``: the note
    durations (twelfths of a beat, ascending) tokens can express; the ``duration`` label
    snaps to the nearest (shorter on a tie); empty when any duration is possible.
    """

    events: tuple[str, ...]
    note: int
    end: int | None = None
    instruments: tuple[str, ...] = ("",)
    durations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.note < len(self.events):
            raise ValueError(f"note event {self.note} is not one of the {len(self.events)} events")
        if self.end is not None and not 0 <= self.end < len(self.events):
            raise ValueError(f"end event {self.end} is not one of the {len(self.events)} events")
        if list(self.durations) != sorted(set(self.durations)):
            raise ValueError("durations must be distinct and ascending")

    def event_code(self, name: str) -> int:
        """Code of an event type given by name (``_`` and ``-`` alike); KeyError when unknown."""
        key = str(name).replace("_", "-")
        for code, event in enumerate(self.events):
            if event.replace("_", "-") == key:
                return code
        raise KeyError(name)

    def duration_label(self, index: int) -> str:
        """The ``index``-th duration in beats (``1/2``, ``1``, ``3/2``)."""
        return str(Fraction(int(self.durations[index]), RESOLUTION))

    def to_json(self) -> dict[str, Any]:
        """JSON form (what a store records as ``event_vocabulary``)."""
        return {"events": list(self.events), "note": self.note, "end": self.end,
                "instruments": list(self.instruments), "durations": list(self.durations)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EventVocabulary:
        """Inverse of :meth:`to_json`; ValueError on a malformed record."""
        try:
            end = data.get("end")
            return cls(tuple(str(e) for e in data["events"]), int(data["note"]),
                       None if end is None else int(end),
                       tuple(str(i) for i in data.get("instruments") or ("",)),
                       tuple(int(d) for d in data.get("durations") or ()))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an event vocabulary: {exc}") from None


@dataclass(frozen=True)
class SongTokens:
    """A whole song as the model's tokens (never truncated), with coordinates per token.

    ``inputs`` (T, ...) are the model input rows of the whole song (MMT: (T, 6) field
    codes; a single-stream language model: (T,) token ids); ``coords`` maps each name of
    :data:`COORDINATES` to a (T,) int64 array; ``dropped`` counts notes the tokenization
    cannot represent; ``song`` is the adapter's own form of the song, which its windows
    and rendering read.
    """

    inputs: np.ndarray
    coords: Mapping[str, np.ndarray]
    dropped: int = 0
    song: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class Window:
    """One model input: ``inputs`` (L, ...) rows, ``token`` (L,) the song token each row
    is (rows may repeat tokens, e.g. a header every window carries), and ``owned`` (L,)
    bool: the rows whose activations are attributed to this window. Over all windows of
    a song every token is owned exactly once."""

    inputs: np.ndarray
    token: np.ndarray
    owned: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class NoteTable:
    """Notes rendered back from a song's tokens (for piano rolls, MIDI, text), one row per
    note in song order: ``token`` (the song token of the note, -1 if none), onset ``beat``
    and ``position`` (twelfths of a beat), MIDI ``pitch``, ``duration`` (twelfths of a
    beat), General MIDI ``program`` and the ``instrument`` name to show."""

    token: np.ndarray
    beat: np.ndarray
    position: np.ndarray
    pitch: np.ndarray
    duration: np.ndarray
    program: np.ndarray
    instrument: np.ndarray

    def __len__(self) -> int:
        return len(self.token)

    def onsets(self) -> np.ndarray:
        """Onset of every note in beats (float64)."""
        return self.beat + self.position / RESOLUTION

    def take(self, rows: Sequence[int] | np.ndarray) -> NoteTable:
        """The notes ``rows``, in that order."""
        import numpy as np

        idx = np.asarray(rows, np.int64)
        return NoteTable(*(np.asarray(getattr(self, f))[idx] for f in self.__dataclass_fields__))

    def program_names(self) -> dict[int, str]:
        """Instrument name of each program present (the first note's)."""
        out: dict[int, str] = {}
        for program, name in zip(self.program, self.instrument, strict=True):
            out.setdefault(int(program), str(name) or f"program-{int(program)}")
        return out


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an activation store: its tokens ``[token_start, token_start + tokens)``
    of the store and its songs ``[song_start, song_stop)`` (shards hold whole songs)."""

    index: int
    tokens: int
    token_start: int
    song_start: int
    song_stop: int


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds, told without loading its weights."""

    d_model: int
    hook_points: list[str]
    n_parameters: int


def window_ranges(n_codes: int, max_seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Half-open code ranges ``(start, end)`` of model windows covering ``n_codes`` completely.

    Windows start at ``0, stride, 2*stride, ...`` (default ``stride = max_seq_len // 2``,
    at least 1) while they end before ``n_codes``; one last window ``(n_codes - max_seq_len,
    n_codes)`` then reaches the end, so every window but a lone short one is ``max_seq_len``
    long, consecutive windows overlap (or touch, when ``stride == max_seq_len``) and nothing
    is truncated. A sequence with ``n_codes <= max_seq_len`` is one window; zero codes, none.

    A code ``i`` fed in window ``(start, end)`` sits at model input position
    ``seq_pos = i - start``. Each code is *owned* (attributed) by exactly one window: the
    first that holds it (where it has the most left context).
    """
    stride = _check_window_args(n_codes, max_seq_len, stride)
    if n_codes == 0:
        return []
    if n_codes <= max_seq_len:
        return [(0, n_codes)]
    spans = [(start, start + max_seq_len) for start in range(0, n_codes - max_seq_len, stride)]
    spans.append((n_codes - max_seq_len, n_codes))
    return spans


def _check_window_args(n_codes: int, max_seq_len: int, stride: int | None) -> int:
    if n_codes < 0:
        raise UserError(f"n_codes must be >= 0, got {n_codes}")
    if max_seq_len < 1:
        raise UserError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if stride is None:
        return max(1, max_seq_len // 2)
    if not 1 <= stride <= max_seq_len:
        raise UserError(f"stride must be between 1 and max_seq_len={max_seq_len}, got {stride}")
    return stride
