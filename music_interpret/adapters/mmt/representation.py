"""MMT's event encoding (Dong et al. 2023), reimplemented to match ``mmt/representation.py``.

A song is a note array (N, 5) ``beat, position, pitch, duration, program`` at 12 time
steps per beat; MMT encodes it as codes (T, 6) ``type, beat, position, pitch, duration,
instrument``. Every field uses code 0 for "none", so value ``v`` has code ``v + 1``
(beat, position, pitch). Durations are snapped to the nearest of ``KNOWN_DURATIONS``
(the shorter one on a tie, like ``np.argmin``) and capped at ``MAX_DURATION``. Programs
are mapped to MMT's 64 instruments; notes of unmapped programs (sound effects etc.) are
dropped. An instrument decodes to the representative program of
``INSTRUMENT_PROGRAM_MAP`` (e.g. "strings" -> 49), so a program survives an
encode/decode round trip only if it is its instrument's representative.

Only numpy is imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import UserError

RESOLUTION = 12
MAX_BEAT = 1024
MAX_DURATION = 384
DIMENSIONS = ("type", "beat", "position", "pitch", "duration", "instrument")
NOTE_FIELDS = ("beat", "position", "pitch", "duration", "program")

TYPE_NAMES = ("start-of-song", "instrument", "start-of-notes", "note", "end-of-song")
SOS, INSTRUMENT, SON, NOTE, EOS = range(5)

KNOWN_DURATIONS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 18, 20, 21, 24, 30, 36, 40, 42,
    48, 60, 72, 84, 96, 120, 144, 168, 192, 384,
)  # fmt: skip

# GM program (0..127) -> MMT instrument name; None = not modelled (notes dropped).
_PROGRAM_GROUPS: tuple[tuple[str | None, tuple[int, ...]], ...] = (
    ("piano", (0, 1, 2, 3)), ("electric-piano", (4, 5)), ("harpsichord", (6,)),
    ("clavinet", (7,)), ("celesta", (8,)), ("glockenspiel", (9,)), ("music-box", (10,)),
    ("vibraphone", (11,)), ("marimba", (12,)), ("xylophone", (13,)),
    ("tubular-bells", (14,)), ("dulcimer", (15,)), ("organ", (16, 17, 18, 20)),
    ("church-organ", (19,)), ("accordion", (21,)), ("harmonica", (22,)),
    ("bandoneon", (23,)), ("nylon-string-guitar", (24,)), ("steel-string-guitar", (25,)),
    ("electric-guitar", (26, 27, 28, 29, 30, 31)), ("bass", (32,)),
    ("electric-bass", (33, 34, 35)), ("slap-bass", (36, 37)), ("synth-bass", (38, 39)),
    ("violin", (40, 110)), ("viola", (41,)), ("cello", (42,)), ("contrabass", (43,)),
    ("strings", (44, 45, 48, 49)), ("harp", (46,)), ("timpani", (47,)),
    ("synth-strings", (50, 51)), ("voices", (52, 53, 54)), ("orchestra-hit", (55,)),
    ("trumpet", (56, 59)), ("trombone", (57,)), ("tuba", (58,)), ("horn", (60,)),
    ("brasses", (61,)), ("synth-brasses", (62, 63)), ("soprano-saxophone", (64,)),
    ("alto-saxophone", (65,)), ("tenor-saxophone", (66,)), ("baritone-saxophone", (67,)),
    ("oboe", (68,)), ("english-horn", (69,)), ("bassoon", (70,)), ("clarinet", (71,)),
    ("piccolo", (72,)), ("flute", (73,)), ("recorder", (74,)), ("pan-flute", (75,)),
    ("ocarina", (79,)), ("lead", tuple(range(80, 88))), ("pad", tuple(range(88, 96))),
    ("sitar", (104,)), ("banjo", (105,)), ("shamisen", (106,)), ("koto", (107,)),
    ("kalimba", (108,)), ("bag-pipe", (109,)), ("shehnai", (111,)),
    ("melodic-tom", (117,)), ("synth-drums", (118, 119)),
)  # fmt: skip

PROGRAM_INSTRUMENT_MAP: dict[int, str | None] = {p: None for p in range(128)}
for _name, _programs in _PROGRAM_GROUPS:
    for _p in _programs:
        PROGRAM_INSTRUMENT_MAP[_p] = _name

# Instrument -> representative program; its order defines MMT's instrument codes 1..64.
INSTRUMENT_PROGRAM_MAP: dict[str, int] = {
    "piano": 0, "electric-piano": 4, "harpsichord": 6, "clavinet": 7, "celesta": 8,
    "glockenspiel": 9, "music-box": 10, "vibraphone": 11, "marimba": 12, "xylophone": 13,
    "tubular-bells": 14, "dulcimer": 15, "organ": 16, "church-organ": 19, "accordion": 21,
    "harmonica": 22, "bandoneon": 23, "nylon-string-guitar": 24, "steel-string-guitar": 25,
    "electric-guitar": 26, "bass": 32, "electric-bass": 33, "slap-bass": 36,
    "synth-bass": 38, "violin": 40, "viola": 41, "cello": 42, "contrabass": 43, "harp": 46,
    "timpani": 47, "strings": 49, "synth-strings": 50, "voices": 52, "orchestra-hit": 55,
    "trumpet": 56, "trombone": 57, "tuba": 58, "horn": 60, "brasses": 61,
    "synth-brasses": 62, "soprano-saxophone": 64, "alto-saxophone": 65,
    "tenor-saxophone": 66, "baritone-saxophone": 67, "oboe": 68, "english-horn": 69,
    "bassoon": 70, "clarinet": 71, "piccolo": 72, "flute": 73, "recorder": 74,
    "pan-flute": 75, "ocarina": 79, "lead": 80, "pad": 88, "sitar": 104, "banjo": 105,
    "shamisen": 106, "koto": 107, "kalimba": 108, "bag-pipe": 109, "shehnai": 111,
    "melodic-tom": 117, "synth-drums": 118,
}  # fmt: skip

#: Instrument names indexed by instrument code; code 0 ("none") is "".
INSTRUMENT_NAMES: tuple[str, ...] = ("", *INSTRUMENT_PROGRAM_MAP)
INSTRUMENT_CODE_MAP: dict[str, int] = {name: i for i, name in enumerate(INSTRUMENT_NAMES) if i}
N_TOKENS = (len(TYPE_NAMES), MAX_BEAT + 2, RESOLUTION + 1, 129, len(KNOWN_DURATIONS) + 1, 65)

# Vectorised lookup tables.
_KNOWN = np.asarray(KNOWN_DURATIONS, dtype=np.int64)
#: duration (0..MAX_DURATION) -> duration code (nearest known duration, first on ties).
DURATION_TO_CODE = np.abs(_KNOWN[None, :] - np.arange(MAX_DURATION + 1)[:, None]).argmin(1) + 1
#: duration code -> duration in time steps (-1 for code 0).
CODE_TO_DURATION = np.concatenate(([-1], _KNOWN))
#: GM program -> instrument code (0 where MMT has no instrument).
PROGRAM_TO_INSTRUMENT = np.array(
    [INSTRUMENT_CODE_MAP.get(PROGRAM_INSTRUMENT_MAP[p] or "", 0) for p in range(128)],
    dtype=np.int64,
)
#: instrument code -> representative GM program (-1 for code 0).
INSTRUMENT_TO_PROGRAM = np.array([-1, *INSTRUMENT_PROGRAM_MAP.values()], dtype=np.int64)


def _with_none(mapping: dict[Any, Any], none_value: Any) -> dict:
    out = dict(mapping)
    out[None] = none_value
    return out


def get_encoding() -> dict[str, Any]:
    """Return the encoding dict exactly as MMT's ``representation.get_encoding()``.

    ``json.dumps`` of it reproduces MMT's ``encoding.json`` byte for byte.
    """
    beat = _with_none({i: i + 1 for i in range(MAX_BEAT + 1)}, 0)
    position = _with_none({i: i + 1 for i in range(RESOLUTION)}, 0)
    pitch = _with_none({i: i + 1 for i in range(128)}, 0)
    duration = _with_none({i: int(c) for i, c in enumerate(DURATION_TO_CODE)}, 0)
    instrument = _with_none(INSTRUMENT_CODE_MAP, 0)
    type_map = {name: i for i, name in enumerate(TYPE_NAMES)}

    def inverse(d: dict) -> dict:
        return {v: k for k, v in d.items()}

    return {
        "resolution": RESOLUTION,
        "max_beat": MAX_BEAT,
        "max_duration": MAX_DURATION,
        "dimensions": list(DIMENSIONS),
        "n_tokens": list(N_TOKENS),
        "type_code_map": type_map,
        "beat_code_map": beat,
        "position_code_map": position,
        "pitch_code_map": pitch,
        "duration_code_map": duration,
        "instrument_code_map": instrument,
        "code_type_map": inverse(type_map),
        "code_beat_map": inverse(beat),
        "code_position_map": inverse(position),
        "code_pitch_map": inverse(pitch),
        "code_duration_map": {i + 1: d for i, d in enumerate(KNOWN_DURATIONS)},
        "code_instrument_map": inverse(instrument),
        "program_instrument_map": dict(PROGRAM_INSTRUMENT_MAP),
        "instrument_program_map": dict(INSTRUMENT_PROGRAM_MAP),
    }


def _check_notes(notes: np.ndarray) -> np.ndarray:
    notes = np.asarray(notes)
    if notes.size == 0:
        return np.zeros((0, 5), dtype=np.int64)
    if notes.ndim != 2 or notes.shape[1] != 5 or not np.issubdtype(notes.dtype, np.integer):
        raise UserError(
            f"notes must be an integer array of shape (N, 5) "
            f"({', '.join(NOTE_FIELDS)}); got {notes.dtype} {notes.shape}"
        )
    notes = notes.astype(np.int64, copy=False)
    limits = {"beat": (0, None), "position": (0, RESOLUTION - 1), "pitch": (0, 127),
              "duration": (0, None), "program": (0, 127)}  # fmt: skip
    for j, (field, (lo, hi)) in enumerate(limits.items()):
        col = notes[:, j]
        bad = (col < lo) | (col > hi) if hi is not None else col < lo
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"notes row {row}: {field}={int(col[row])} is out of range")
    return notes


def encode_notes(notes: np.ndarray) -> np.ndarray:
    """Encode notes (N, 5) into MMT codes (T, 6) int64, exactly like MMT's ``encode_notes``.

    Start-of-song, one instrument row per distinct instrument (sorted by code),
    start-of-notes, one row per note in the given order (notes with beat > 1024 or an
    unmapped program are skipped), end-of-song.
    """
    notes = _check_notes(notes)
    instrument = PROGRAM_TO_INSTRUMENT[notes[:, 4]]
    keep = (notes[:, 0] <= MAX_BEAT) & (instrument > 0)
    kept, inst = notes[keep], instrument[keep]
    present = np.unique(instrument[instrument > 0])  # MMT lists instruments of all notes
    rows = np.zeros((len(present) + len(kept) + 3, 6), dtype=np.int64)
    rows[0, 0] = SOS
    rows[1 : 1 + len(present), 0] = INSTRUMENT
    rows[1 : 1 + len(present), 5] = present
    start = 1 + len(present)
    rows[start, 0] = SON
    body = rows[start + 1 : start + 1 + len(kept)]
    body[:, 0] = NOTE
    body[:, 1] = kept[:, 0] + 1
    body[:, 2] = kept[:, 1] + 1
    body[:, 3] = kept[:, 2] + 1
    body[:, 4] = DURATION_TO_CODE[np.minimum(kept[:, 3], MAX_DURATION)]
    body[:, 5] = inst
    rows[-1, 0] = EOS
    return rows


def encode_song(
    notes: np.ndarray, max_beat: int | None = None, max_seq_len: int | None = None
) -> np.ndarray:
    """Encode a song the way MMT's ``MusicDataset`` does without augmentation.

    If the last note's beat + 1 exceeds ``max_beat``, notes at beat >= ``max_beat``
    are dropped; if the codes are longer than ``max_seq_len``, the first
    ``max_seq_len - 1`` codes are kept plus the final end-of-song code.
    """
    notes = _check_notes(notes)
    if max_beat is not None and len(notes) and notes[-1, 0] + 1 > max_beat:
        notes = notes[notes[:, 0] < max_beat]
    codes = encode_notes(notes)
    if max_seq_len is not None and len(codes) > max_seq_len:
        codes = np.concatenate((codes[: max_seq_len - 1], codes[-1:]))
    return codes


#: ``N_TOKENS`` with no limit on the beat (song-level codes of songs longer than MAX_BEAT)
SONG_N_TOKENS = (N_TOKENS[0], np.iinfo(np.int64).max, *N_TOKENS[2:])


def check_codes(codes: np.ndarray, n_tokens: tuple[int, ...] | list[int] = N_TOKENS) -> np.ndarray:
    """Return ``codes`` as int64 (T, 6), raising ``UserError`` on a bad shape or code."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != 6 or not np.issubdtype(codes.dtype, np.integer):
        raise UserError(
            f"codes must be an integer array of shape (T, 6); got {codes.dtype} {codes.shape}"
        )
    codes = codes.astype(np.int64, copy=False)
    bad = (codes < 0) | (codes >= np.asarray(n_tokens)[None, :])
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise UserError(
            f"codes row {row}: {DIMENSIONS[col]} code {int(codes[row, col])} "
            f"is outside 0..{n_tokens[col] - 1}"
        )
    return codes


def decode_notes(codes: np.ndarray) -> np.ndarray:
    """Decode codes (T, 6) into notes (N, 5) int64 like MMT's ``decode_notes``.

    Non-note rows are skipped and decoding stops at the first end-of-song. A note's
    program is its instrument's representative program.
    """
    codes = check_codes(codes)
    eos = np.flatnonzero(codes[:, 0] == EOS)
    if len(eos):
        codes = codes[: eos[0]]
    notes = codes[codes[:, 0] == NOTE]
    null = notes[:, 1:] == 0
    if null.any():
        row, col = (int(i) for i in np.argwhere(null)[0])
        raise UserError(
            f"note code {row} has no {DIMENSIONS[col + 1]} (code 0); MMT cannot decode it"
        )
    out = np.empty((len(notes), 5), dtype=np.int64)
    out[:, 0] = notes[:, 1] - 1
    out[:, 1] = notes[:, 2] - 1
    out[:, 2] = notes[:, 3] - 1
    out[:, 3] = CODE_TO_DURATION[notes[:, 4]]
    out[:, 4] = INSTRUMENT_TO_PROGRAM[notes[:, 5]]
    return out


def token_metadata(codes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token musical metadata for codes (T, 6); every array has length T.

    * ``event_type`` int8 0..4 (start-of-song, instrument, start-of-notes, note, end-of-song)
    * ``beat``, ``position`` (onset inside the beat, 1/12 beat), ``pitch`` (MIDI) and
      ``duration`` (1/12 beats, the known duration of the code): int64, -1 unless a note
    * ``instrument``: MMT instrument code 1..64 on instrument and note rows, else -1
    * ``program``: the instrument's representative GM program
      (``INSTRUMENT_PROGRAM_MAP``) on instrument and note rows, else -1
    * ``instrument_name``: ``INSTRUMENT_NAMES[instrument]`` ("" where none)

    Codes 0 ("none") inside a note or instrument row also give -1 / "".
    Beat codes are not limited to ``MAX_BEAT``: whole songs carry their own beats.
    """
    codes = check_codes(codes, SONG_N_TOKENS)
    etype = codes[:, 0]
    is_note = etype == NOTE
    has_inst = is_note | (etype == INSTRUMENT)

    def field(col: int, table: np.ndarray | None = None, rows: np.ndarray = is_note):
        c = codes[:, col]
        value = table[c] if table is not None else c - 1
        return np.where(rows & (c > 0), value, -1).astype(np.int64)

    inst = field(5, np.arange(len(INSTRUMENT_NAMES)), has_inst)
    names = np.asarray(INSTRUMENT_NAMES)
    return {
        "event_type": etype.astype(np.int8),
        "beat": field(1),
        "position": field(2),
        "pitch": field(3),
        "duration": field(4, CODE_TO_DURATION),
        "instrument": inst,
        "program": np.where(inst > 0, INSTRUMENT_TO_PROGRAM[np.maximum(inst, 0)], -1),
        "instrument_name": names[np.maximum(inst, 0)],
    }
