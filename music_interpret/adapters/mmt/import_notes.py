"""Import your own MIDI and MusicXML files as an MMT notes dataset (a ``data.path`` folder).

``python -m music_interpret.adapters.mmt.import_notes SRC... --out DIR`` converts each file
(folders are searched recursively for ``.mid``/``.midi``/``.musicxml``/``.mxl``/``.xml``)
and writes ``DIR/<dataset-name>_notes/notes/`` in the layout of the demo build
(:mod:`.demo_data`): ``<name>.npy``/``.csv``, ``encoding.json``, ``names.txt``,
``{train,valid,test}-names.txt`` and ``sources.json``.

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
repeats expanded, its program rules). Songs longer than the model's ``max_beat`` are kept
whole; the pipeline covers them with windows (:mod:`.windows`). The split is MMT's
``split.py``: ``random.seed(seed)``, ``random.sample(names, n_valid + n_test)``, valid
first, with ``n = int(len(names) * fraction)``. A file that cannot be converted stops the
command with one line naming it (exit status 2); nothing is written then.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from . import representation
from .dataset import SPLITS
from .demo_data import MAX_BEATS, MIN_BEATS, MIN_NOTES, RESOLUTION, mmt_filter
from .meters import Meter, shift_meters
from .writing import write_dataset

GENERATOR = "music_interpret.adapters.mmt.import_notes"
MIDI_SUFFIXES = (".mid", ".midi")
MUSICXML_SUFFIXES = (".musicxml", ".mxl", ".xml")
DRUM_CHANNEL = 9  # MIDI channel 10, counted from 0
DEFAULT_FRACTION = 0.1  # MMT's split.py default for valid and test
_DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_TIMED_META = {"set_tempo", "key_signature", "time_signature", "lyrics", "marker", "text"}


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
    pairs note-ons and note-offs; raises ``UserError`` naming ``path`` if mido cannot read it."""
    import mido

    try:
        midi = mido.MidiFile(str(path))
    except Exception as exc:  # mido raises OSError, EOFError, ValueError, KeyError, ...
        raise UserError(f"{path}: not a readable MIDI file ({_describe(exc)})") from None
    if midi.type == 2:
        raise UserError(f"{path}: type 2 (asynchronous) MIDI files are not supported")
    if not midi.ticks_per_beat or midi.ticks_per_beat <= 0:
        raise UserError(f"{path}: MIDI files timed in SMPTE frames are not supported")
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
    """One MIDI file as an MMT song; raises ``UserError`` naming ``path`` when MMT drops it."""
    notes, end_tick, meters, parts, ppq = convert_midi(path)
    if not len(notes):
        dropped = sum(p["notes"] for p in parts)
        why = f" ({dropped} notes on drums or unmodelled programs)" if dropped else ""
        raise UserError(f"{path}: no notes MMT can represent{why}")
    kept, reason = mmt_filter(notes, end_tick)
    if kept is None:
        raise UserError(f"{path}: {reason} (MMT's filter)")
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
        raise UserError(f"{path}: {exc.detail} ({exc.category})") from None
    parts = [{"part": part, "program": program, "rule": rule} for part, program, rule in song.parts]
    return ImportedSong(name, path, "musicxml", song.notes, [list(m) for m in song.meters],
                        parts, {"repeats": song.repeats})


# --------------------------------------------------------------------------- files


def find_sources(sources: Sequence[Path]) -> list[Path]:
    """The music files named or found (recursively, sorted) in folders, each once."""
    suffixes = MIDI_SUFFIXES + MUSICXML_SUFFIXES
    found: list[Path] = []
    for source in sources:
        if source.is_dir():
            inside = sorted(p for p in source.rglob("*")
                            if p.is_file() and p.suffix.lower() in suffixes
                            and not any(part.startswith(".") for part in p.relative_to(source).parts))
            if not inside:
                raise UserError(f"{source}: no {'/'.join(suffixes)} files in this folder")
            found.extend(inside)
        elif source.is_file():
            if source.suffix.lower() not in suffixes:
                raise UserError(f"{source}: unsupported file type {source.suffix or '(none)'!r}; "
                                f"use {', '.join(suffixes)}")
            found.append(source)
        else:
            raise UserError(f"{source}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def song_names(paths: Sequence[Path]) -> list[str]:
    """MMT-safe names (``[a-z0-9_-]``, no dots) from the file stems; repeats get ``_2``, ..."""
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = re.sub(r"[^a-z0-9_-]+", "_", path.stem.lower()).strip("_") or "song"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        names.append(name)
    return names


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Raise ``UserError`` unless both shares lie in [0, 1) and leave some songs to train."""
    for label, value in (("valid", valid_fraction), ("test", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"--{label}-fraction must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1:
        raise UserError("--valid-fraction plus --test-fraction must be below 1")


def mmt_split(names: Sequence[str], valid_fraction: float, test_fraction: float,
              seed: int) -> dict[str, tuple[str, ...]]:
    """MMT's ``split.py``: a seeded sample of ``int(n * fraction)`` valid then test names
    (in sample order); train keeps the input order."""
    check_fractions(valid_fraction, test_fraction)
    n_valid, n_test = int(len(names) * valid_fraction), int(len(names) * test_fraction)
    sampled = random.Random(seed).sample(list(names), n_valid + n_test)
    held = set(sampled)
    return {"train": tuple(n for n in names if n not in held),
            "valid": tuple(sampled[:n_valid]), "test": tuple(sampled[n_valid:])}


def import_files(sources: Sequence[Path], out: Path, dataset_name: str = "imported",
                 valid_fraction: float = DEFAULT_FRACTION, test_fraction: float = DEFAULT_FRACTION,
                 seed: int = 0) -> tuple[Path, list[ImportedSong], dict[str, tuple[str, ...]]]:
    """Convert ``sources`` and write ``out/<dataset_name>_notes``; returns (folder, songs, splits)."""
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise UserError(f"dataset name {dataset_name!r} must match [a-z0-9][a-z0-9_-]*")
    check_fractions(valid_fraction, test_fraction)
    final = out / f"{dataset_name}_notes"
    paths = find_sources(sources)
    if final.exists() and any(_inside(p, final) for p in paths):
        raise UserError(f"{final} holds input files; choose another --out or --dataset-name")
    songs = [
        (import_midi if path.suffix.lower() in MIDI_SUFFIXES else import_musicxml)(path, name)
        for path, name in zip(paths, song_names(paths), strict=True)
    ]
    splits = mmt_split([s.name for s in songs], valid_fraction, test_fraction, seed)
    sources_json = _sources(songs, splits, valid_fraction, test_fraction, seed)
    write_dataset(final, GENERATOR, [(s.name, s.notes) for s in songs], splits, sources_json)
    return final, songs, splits


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _sources(songs: Sequence[ImportedSong], splits: dict[str, tuple[str, ...]],
             valid_fraction: float, test_fraction: float, seed: int) -> dict[str, Any]:
    split_of = {name: split for split, names in splits.items() for name in names}
    versions = {"mido_version": metadata.version("mido")}
    if any(s.format == "musicxml" for s in songs):
        versions["music21_version"] = metadata.version("music21")
    return {
        "generator": GENERATOR,
        "resolution": RESOLUTION,
        **versions,
        "filters": {"min_beats": MIN_BEATS, "max_beats": MAX_BEATS, "min_notes": MIN_NOTES},
        "split": {"method": "MMT split.py: random.seed(seed); random.sample(names, n_valid + n_test)",
                  "seed": seed, "valid_fraction": valid_fraction, "test_fraction": test_fraction},
        "songs": {
            s.name: {
                "source": str(s.source.resolve()),
                "format": s.format,
                **s.extra,
                "parts": s.parts,
                "notes": len(s.notes),
                "beats": int(s.notes[-1, 0]) + 1,
                "meters": s.meters,
                "split": split_of[s.name],
            }
            for s in songs
        },
    }


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m music_interpret.adapters.mmt.import_notes",
        description="Convert your own MIDI (.mid/.midi) and MusicXML (.musicxml/.mxl/.xml) "
        "files into an MMT notes dataset, usable as the pipeline's data.path.",
    )
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                        help="music files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True,
                        help="parent folder of <dataset-name>_notes/ (e.g. data/base)")
    parser.add_argument("--dataset-name", default="imported",
                        help="dataset name, written to <out>/<name>_notes (default: imported)")
    parser.add_argument("--valid-fraction", type=float, default=DEFAULT_FRACTION,
                        help="share of songs in valid-names.txt (default: 0.1, as MMT)")
    parser.add_argument("--test-fraction", type=float, default=DEFAULT_FRACTION,
                        help="share of songs in test-names.txt (default: 0.1, as MMT)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0, as MMT)")
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    final, songs, splits = import_files(args.sources, args.out, args.dataset_name,
                                        args.valid_fraction, args.test_fraction, args.seed)
    counts = ", ".join(f"{split} {len(splits[split])}" for split in SPLITS)
    notes = sum(len(s.notes) for s in songs)
    print(f"{args.dataset_name}: wrote {len(songs)} songs ({counts}; {notes} notes) to {final}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; one line and exit status 2 on a bad file or option."""
    from ...seedcli import guarded_main

    return guarded_main(_run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
