"""REMI tokens of MMT note arrays (MidiTok 3) and the musical coordinates of every token.

A song is an MMT notes array (N, 5): beat, position (twelfths of a beat), pitch, duration
(twelfths), program. It becomes a symusic ``Score`` at 12 ticks per quarter (one beat =
one quarter note, so ticks are twelfths), one track per program, which MidiTok's REMI
tokenizes into one stream (``one_token_stream_for_programs``):

``BOS, Bar, Position_k, Program_p, Pitch_p, Duration_d, Program_p, Pitch_p, ..., Bar, ..., EOS``

Bars are 4 beats (no time-signature tokens: REMI's default 4/4 grid), positions
``0..47`` are twelfths of a beat inside the bar, durations go up to 12 beats (twelfths up
to 4 beats, quarter beats after). The walk in :func:`token_coordinates` gives each token
the beat and position of the latest Bar/Position, the program of the latest Program
token, and on a Pitch token the pitch and the duration of the Duration token after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from miditok import REMI

#: the file the tokenizer's parameters are saved to, next to the model
TOKENIZER_FILE = "miditok.json"
RESOLUTION = 12  # twelfths of a beat, music-interpret's resolution
BEATS_PER_BAR = 4
#: event types, in code order (``event_type`` coordinate)
EVENTS = ("BOS", "Bar", "Position", "Program", "Pitch", "Duration", "EOS", "PAD")
NOTE = EVENTS.index("Pitch")
END = EVENTS.index("EOS")
PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def make_tokenizer() -> REMI:
    """The REMI tokenizer the demo model is trained with (see the module docstring)."""
    from miditok import REMI, TokenizerConfig

    config = TokenizerConfig(
        pitch_range=(21, 109), beat_res={(0, 4): RESOLUTION, (4, 12): 4}, use_velocities=False,
        use_programs=True, one_token_stream_for_programs=True, programs=list(range(128)),
        use_time_signatures=False, use_tempos=False, use_rests=False, use_chords=False,
        special_tokens=["PAD", "BOS", "EOS"])
    return REMI(config)


def load_tokenizer(path: Path) -> REMI:
    """The tokenizer saved at ``path`` (``miditok.json``)."""
    from miditok import REMI

    return REMI(params=Path(path))


def pitch_name(pitch: int) -> str:
    """``60`` -> ``C4``."""
    return f"{PITCH_NAMES[pitch % 12]}{pitch // 12 - 1}"


def parse_duration(value: str) -> int:
    """A REMI duration ``beats.steps.resolution`` in twelfths of a beat."""
    beats, steps, res = (int(v) for v in value.split("."))
    return int(round((beats + Fraction(steps, res)) * RESOLUTION))


class Vocabulary:
    """What every token id of a REMI tokenizer is: its event type and value."""

    def __init__(self, tokenizer: REMI) -> None:
        vocab: Mapping[str, int] = tokenizer.vocab
        size = max(vocab.values()) + 1
        self.size = size
        self.event = np.full(size, EVENTS.index("PAD"), np.int64)
        self.value = np.full(size, -1, np.int64)  # position / program / pitch / duration
        self.names = [""] * size
        self.positions_per_beat = max(int(r) for r in tokenizer.config.beat_res.values())
        for token, i in vocab.items():
            kind, _, value = token.partition("_")
            self.names[i] = token
            if kind not in EVENTS:
                continue
            self.event[i] = EVENTS.index(kind)
            if kind in ("Position", "Program", "Pitch"):
                self.value[i] = int(value)
            elif kind == "Duration":
                self.value[i] = parse_duration(value)
        self.bos, self.eos, self.pad = vocab["BOS_None"], vocab["EOS_None"], vocab["PAD_None"]
        pitches = self.value[self.event == NOTE]
        self.pitch_range = (int(pitches.min()), int(pitches.max()))
        self.durations = tuple(sorted({int(d) for d in self.value[self.event == EVENTS.index("Duration")]}))

    def row_name(self, i: int) -> str:
        """Name of token id ``i`` as an embedding row: ``pitch=C4``, ``position=6`` (twelfths
        of a beat inside the bar), ``duration=1/2`` (beats), ``program=40``, ``bar``."""
        kind, value = EVENTS[int(self.event[i])], int(self.value[i])
        if kind == "Pitch":
            return f"pitch={pitch_name(value)}"
        if kind == "Position":
            return f"position={self.twelfths(value)}"
        if kind == "Duration":
            return f"duration={Fraction(value, RESOLUTION)}"
        if kind == "Program":
            return f"program={value}"
        return kind.lower() if self.names[i].split("_")[0] == kind else self.names[i]

    def ids_from_coords(self, coords: Mapping[str, np.ndarray]) -> np.ndarray:
        """Token id of every token from its coordinates (-1 where none matches): the event type
        with, for Position, Program, Pitch and Duration tokens, the value they carry."""
        event = np.asarray(coords["event_type"], np.int64)
        table: dict[tuple[int, int], int] = {}
        for i in range(self.size):
            kind = EVENTS[int(self.event[i])]
            value = self.twelfths(int(self.value[i])) if kind == "Position" else int(self.value[i])
            table.setdefault((int(self.event[i]), value if self.value[i] >= 0 else -1), i)
        bar_pos = np.asarray(coords["beat"], np.int64) % BEATS_PER_BAR * RESOLUTION + np.asarray(coords["position"])
        value = np.full(len(event), -1, np.int64)
        for kind, column in (("Position", bar_pos), ("Program", coords["program"]),
                             ("Pitch", coords["pitch"]), ("Duration", coords["duration"])):
            rows = event == EVENTS.index(kind)
            value[rows] = np.asarray(column, np.int64)[rows]
        return np.asarray([table.get((int(e), int(v)), -1) for e, v in zip(event, value, strict=True)],
                          np.int64)

    def ids(self, event: str, values: Sequence[int] | None = None) -> list[int]:
        """Token ids of ``event`` (with one of ``values`` when given)."""
        code = EVENTS.index(event)
        rows = np.flatnonzero(self.event == code)
        if values is not None:
            rows = rows[np.isin(self.value[rows], np.asarray(list(values), np.int64))]
        return [int(i) for i in rows]

    def twelfths(self, position: int) -> int:
        """A Position value (steps of ``positions_per_beat`` inside the bar) in twelfths."""
        return int(round(Fraction(position * RESOLUTION, self.positions_per_beat)))

    def token_id(self, event: str, value: int | None = None) -> int | None:
        """The id of one token (``value`` in this module's units), or None."""
        code = EVENTS.index(event)
        rows = np.flatnonzero(self.event == code)
        if value is None:
            return int(rows[0]) if len(rows) else None
        if event == "Position":
            hits = [i for i in rows if self.twelfths(int(self.value[i])) == value]
        else:
            hits = [i for i in rows if int(self.value[i]) == value]
        return int(hits[0]) if hits else None


def notes_to_score(notes: np.ndarray) -> Any:
    """A symusic Score (12 ticks per beat, one track per program) of MMT notes (N, 5)."""
    import symusic

    score = symusic.Score(RESOLUTION)
    notes = np.asarray(notes, np.int64).reshape(-1, 5)
    for program in sorted({int(p) for p in notes[:, 4]}):
        track = symusic.Track(program=program, is_drum=False)
        for beat, pos, pitch, dur, _ in notes[notes[:, 4] == program]:
            track.notes.append(symusic.Note(int(beat * RESOLUTION + pos), max(1, int(dur)), int(pitch), 64))
        score.tracks.append(track)
    return score


def encode_notes(tokenizer: REMI, notes: np.ndarray) -> np.ndarray:
    """Token ids (T,) of a song: BOS, the REMI stream, EOS."""
    vocab = tokenizer.vocab
    ids: list[int] = []
    if len(notes):
        seq = tokenizer.encode(notes_to_score(notes))
        seq = seq[0] if isinstance(seq, list) else seq
        ids = list(seq.ids)
    return np.asarray([vocab["BOS_None"], *ids, vocab["EOS_None"]], np.int64)


def token_coordinates(vocab: Vocabulary, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Coordinates of every token (see the module docstring); -1 where one does not apply.
    ``instrument`` is ``program + 1`` (0: none); beats count from the first Bar of ``ids``."""
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    out = {k: np.full(n, -1, np.int64)
           for k in ("event_type", "beat", "position", "pitch", "duration", "instrument", "program")}
    events = vocab.event[np.clip(ids, 0, vocab.size - 1)]
    values = vocab.value[np.clip(ids, 0, vocab.size - 1)]
    out["event_type"] = events.copy()
    bar, beat, pos, program = -1, -1, -1, -1
    for i in range(n):
        kind = EVENTS[int(events[i])]
        if kind == "Bar":
            bar += 1
            beat, pos, program = bar * BEATS_PER_BAR, 0, -1
        elif kind == "Position":
            step = vocab.twelfths(int(values[i]))
            beat, pos = max(bar, 0) * BEATS_PER_BAR + step // RESOLUTION, step % RESOLUTION
        elif kind == "Program":
            program = int(values[i])
        if kind in ("BOS", "EOS", "PAD"):
            continue
        out["beat"][i], out["position"][i] = beat, pos
        if kind in ("Program", "Pitch", "Duration"):
            out["program"][i] = program
            out["instrument"][i] = program + 1 if program >= 0 else -1
        if kind == "Pitch":
            out["pitch"][i] = int(values[i])
            if i + 1 < n and EVENTS[int(events[i + 1])] == "Duration":
                out["duration"][i] = int(values[i + 1])
        elif kind == "Duration":
            out["duration"][i] = int(values[i])
    return out


def instrument_names() -> tuple[str, ...]:
    """Instrument code ``program + 1`` -> General MIDI name (code 0: none)."""
    from miditok.constants import MIDI_INSTRUMENTS

    return ("", *(str(i["name"]) for i in MIDI_INSTRUMENTS[:128]))
