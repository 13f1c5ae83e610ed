"""Converting one MIDI or MusicXML file into MMT notes (the per-file half of :mod:`.import_notes`).

MIDI follows MMT's ``convert_lmd.py`` + ``extract.py`` with muspy 0.5.0's mido reader
(re-implemented on mido, no muspy needed):

* per MIDI track, each channel starts at program 0 and a note takes its channel's program at
  its note-off; a note-on with velocity 0 is a note-off; a note-off closes the earliest open
  note of its channel and pitch (muspy's "fifo"); notes still open close at the track's end;
* ticks are rescaled from the file's PPQ to 12 per beat, onset and duration each with
  Python's ``round`` (muspy's ``adjust_resolution``); a zero duration becomes 1;
* drums (channel 10) and programs MMT's table does not model are dropped (``extract_notes``);
* rows ``(beat, position, pitch, duration, program)`` are de-duplicated and sorted; MMT's
  filters apply (end before beat 40 or after beat 8000 -- the end counts every timed event,
  drums included, as ``Music.get_end_time`` does -- or fewer than 50 notes); the first
  note's beat is shifted to 0. Tempo changes do not matter: MMT counts beats, not seconds.

MusicXML goes through the corpus build's conversion (:func:`.corpus.convert_task`: music21,
repeats expanded, its program rules). A file MMT cannot use raises :class:`SongRefused`
(a ``UserError`` naming the file, with a category for the import report).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from . import representation
from .meters import Meter, shift_meters
from .music21_read import RESOLUTION, mmt_filter

MIDI_SUFFIXES = (".mid", ".midi")
MUSICXML_SUFFIXES = (".musicxml", ".mxl", ".xml")
DRUM_CHANNEL = 9  # MIDI channel 10, counted from 0
_TIMED_META = {"set_tempo", "key_signature", "time_signature", "lyrics", "marker", "text"}
_FILTER_CATEGORY = {"shorter": "too-short", "longer": "too-long", "fewer": "too-few-notes"}


class SongRefused(UserError):
    """A file that cannot become an MMT song; ``category`` names the kind of reason."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


@dataclass
class ImportedSong:
    """One converted file, ready to be written."""

    name: str
    source: Path
    format: str  # "midi" | "musicxml"
    notes: np.ndarray
    meters: list[list[float | int]]
    parts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- MIDI


@dataclass
class _MidiNote:
    onset: int  # ticks at the file's PPQ
    end: int
    pitch: int
    program: int
    channel: int
    track: int


def read_midi_notes(path: Path) -> tuple[Any, list[_MidiNote], list[int], list[tuple[int, int, int]]]:
    """``(MidiFile, notes, timed meta-event ticks, time signatures)`` as muspy's mido reader
    pairs note-ons and note-offs; raises ``SongRefused`` naming ``path`` if mido cannot read it."""
    import mido

    try:
        midi = mido.MidiFile(str(path))
    except Exception as exc:  # mido raises OSError, EOFError, ValueError, KeyError, ...
        raise SongRefused(f"{path}: not a readable MIDI file ({describe(exc)})", "unreadable") from None
    if midi.type == 2:
        raise SongRefused(f"{path}: type 2 (asynchronous) MIDI files are not supported", "unsupported")
    if not midi.ticks_per_beat or midi.ticks_per_beat <= 0:
        raise SongRefused(f"{path}: MIDI files timed in SMPTE frames are not supported", "unsupported")
    notes: list[_MidiNote] = []
    events: list[int] = []
    time_signatures: list[tuple[int, int, int]] = []
    for index, track in enumerate(midi.tracks):
        time = 0
        programs = [0] * 16
        active: dict[tuple[int, int], list[int]] = defaultdict(list)
        for msg in track:
            time += msg.time
            if msg.type in _TIMED_META:
                events.append(time)
                if msg.type == "time_signature":
                    time_signatures.append((time, msg.numerator, msg.denominator))
            elif msg.type == "end_of_track":
                break
            elif msg.type == "program_change":
                programs[msg.channel] = msg.program
            elif msg.type == "note_on" and msg.velocity > 0:
                active[(msg.channel, msg.note)].append(time)
            elif msg.type in ("note_on", "note_off"):
                onsets = active.get((msg.channel, msg.note))
                if onsets:
                    notes.append(_MidiNote(onsets.pop(0), time, msg.note,
                                           programs[msg.channel], msg.channel, index))
        for (channel, pitch), onsets in active.items():
            notes.extend(_MidiNote(onset, time, pitch, programs[channel], channel, index)
                         for onset in onsets)
    return midi, notes, events, time_signatures


def rescale(tick: int, ppq: int) -> int:
    """``tick`` at ``ppq`` ticks per beat on MMT's 12 per beat (muspy's ``adjust_resolution``)."""
    return round(tick * (RESOLUTION / ppq))


def convert_midi(path: Path) -> tuple[np.ndarray, int, list[Meter], list[dict[str, Any]], int]:
    """``(sorted unique rows, end tick, meters, parts, ppq)`` of a MIDI file at resolution 12
    (unshifted, unfiltered); ``parts`` has one entry per (track, channel, program)."""
    midi, notes, events, time_signatures = read_midi_notes(path)
    ppq = int(midi.ticks_per_beat)
    rows: set[tuple[int, int, int, int, int]] = set()
    end_tick = max((rescale(t, ppq) for t in events), default=0)
    counts: dict[tuple[int, int, int], int] = defaultdict(int)
    for note in notes:
        onset = rescale(note.onset, ppq)
        duration = max(1, rescale(note.end - note.onset, ppq))
        end_tick = max(end_tick, onset + duration)
        counts[(note.track, note.channel, note.program)] += 1
        if note.channel == DRUM_CHANNEL or representation.PROGRAM_INSTRUMENT_MAP[note.program] is None:
            continue
        beat, position = divmod(onset, RESOLUTION)
        rows.add((beat, position, note.pitch, duration, note.program))
    names = {i: _track_name(track) for i, track in enumerate(midi.tracks)}
    parts = [_midi_part(key, n, names[key[0]]) for key, n in sorted(counts.items())]
    array = np.array(sorted(rows), dtype=np.int64).reshape(-1, 5)
    return array, end_tick, midi_meters(time_signatures, ppq), parts, ppq


def _track_name(track: Any) -> str:
    return next((str(msg.name) for msg in track if msg.type == "track_name"), "")


def _midi_part(key: tuple[int, int, int], n_notes: int, name: str) -> dict[str, Any]:
    track, channel, program = key
    part: dict[str, Any] = {"track": track, "name": name, "channel": channel + 1,
                            "program": program, "notes": n_notes}
    if channel == DRUM_CHANNEL:
        part["dropped"] = "drums (channel 10), which MMT does not model"
    elif representation.PROGRAM_INSTRUMENT_MAP[program] is None:
        part["dropped"] = f"program {program} is not in MMT's instrument table"
    else:
        part["instrument"] = representation.PROGRAM_INSTRUMENT_MAP[program]
    return part


def midi_meters(time_signatures: Sequence[tuple[int, int, int]], ppq: int) -> list[Meter]:
    """Time-signature segments (see :mod:`.meters`) in beats from the file's start; one at
    the same tick as an earlier one replaces it, a repetition on the bar grid is dropped."""
    segments: list[Meter] = []
    for tick, num, den in sorted(time_signatures, key=lambda ts: ts[0]):
        if not num or not den:
            continue
        start = rescale(tick, ppq) / RESOLUTION
        if segments and segments[-1][0] == start:
            segments.pop()
        if segments:
            start0, n0, d0 = segments[-1]
            bars = (start - start0) / (n0 * 4.0 / d0)
            if (n0, d0) == (num, den) and abs(bars - round(bars)) < 1e-6:
                continue
        segments.append((start, int(num), int(den)))
    return segments


def import_midi(path: Path, name: str) -> ImportedSong:
    """One MIDI file as an MMT song; raises ``SongRefused`` naming ``path`` when MMT drops it."""
    notes, end_tick, meters, parts, ppq = convert_midi(path)
    if not len(notes):
        dropped = sum(p["notes"] for p in parts)
        why = f" ({dropped} notes on drums or unmodelled programs)" if dropped else ""
        raise SongRefused(f"{path}: no notes MMT can represent{why}", "no-notes")
    kept, reason = mmt_filter(notes, end_tick)
    if kept is None:
        raise SongRefused(f"{path}: {reason} (MMT's filter)", _FILTER_CATEGORY[reason.split(" ")[0]])
    first_beat = int(notes[0, 0])
    return ImportedSong(name, path, "midi", kept, shift_meters(meters, first_beat), parts,
                        {"ppq": ppq})


# --------------------------------------------------------------------------- MusicXML


def import_musicxml(path: Path, name: str) -> ImportedSong:
    """One MusicXML file through the corpus build's conversion (music21)."""
    from .corpus import SkipSong, Task, convert_task

    task = Task(subcorpus="", corpus_path=path.name, path=str(path), kind="score")
    try:
        song = convert_task(task)
    except SkipSong as exc:
        raise SongRefused(f"{path}: {exc.detail} ({exc.category})", exc.category) from None
    parts = [{"part": part, "program": program, "rule": rule} for part, program, rule in song.parts]
    return ImportedSong(name, path, "musicxml", song.notes, [list(m) for m in song.meters],
                        parts, {"repeats": song.repeats})


def import_song(path: Path, name: str) -> ImportedSong:
    """``path`` (MIDI or MusicXML, by its suffix) as the MMT song ``name``."""
    if path.suffix.lower() in MIDI_SUFFIXES:
        return import_midi(path, name)
    return import_musicxml(path, name)


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (at most 160 characters of message)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
