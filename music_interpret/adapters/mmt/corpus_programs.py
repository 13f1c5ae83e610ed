"""Which MMT instrument (General MIDI program) each part of a music21 corpus score gets
(used by :mod:`.corpus`).

**Programs** (:func:`assign_programs`), per part, the first rule that applies:

1. ``name``: the part name matches :data:`NAME_RULES` (instruments, then voices). Voices
   follow the demo chorales' convention (MMT's Bach fixtures): soprano/cantus/canto/
   superius -> 40 (violin), alto/altus -> 41 (viola), tenor -> 42 (cello), bass/bassus/
   basso/baritone -> 43 (contrabass). A voice of no fixed range (quintus, sextus,
   contratenor, triplum, "voice", choir, ...) takes the ``range`` rule.
2. ``instrument``: music21's instrument name matches :data:`NAME_RULES`.
3. ``midi``: music21's ``midiProgram``, when MMT's encoding maps it to an instrument.
4. ``staff``: one staff of a multi-staff part (music21's ``PartStaff``): 0 (piano).
5. ``melody``: the only part of a score: 40 (monophonic folk tunes: one melody instrument).
6. ``range``: the voice of the part's mean pitch: >= 64.5 -> 40, >= 58.5 -> 41,
   >= 51.5 -> 42, else 43.

The part name is tried before ``midiProgram`` because, in this corpus, the stored programs
are mostly notation-software defaults (piano for Monteverdi's voices, String Ensemble for
every Haydn/Mozart quartet part, "choir" for every Palestrina voice), while the names are
specific. In the vocal collections (:data:`VOCAL_SUBCORPORA`) an unnamed part skips rules
2-5 (their instrument names, e.g. "Tenor Sax", are playback placeholders).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from . import representation

VOCAL_SUBCORPORA = frozenset(
    {"palestrina", "josquin", "trecento", "ciconia", "luca", "lusitano", "monteverdi"}
)
MELODY_PROGRAM = 40
STAFF_PROGRAM = 0  # an unnamed staff of a multi-staff part: piano
RANGE_PROGRAMS = ((64.5, 40), (58.5, 41), (51.5, 42))  # mean pitch >= bound -> program
LOW_PROGRAM = 43

# (regex on the lower-cased name with non-letters as spaces, program); None = range rule
NAME_RULES: tuple[tuple[str, int | None], ...] = (
    (r"\bcontinuo\b", 19),
    (r"\bsoprano sax", 64), (r"\balto sax", 65), (r"\btenor sax", 66),
    (r"\bbari(tone)? sax", 67), (r"\bsax", 65),
    (r"cello", 42),
    (r"contrabass|double bass|\bviolone\b|kontrabass", 43),
    (r"\bviola\b|\bviole\b|bratsche", 41),
    (r"\bviolin|\bfiddle", 40),
    (r"harpsichord|cembalo|clavecin", 6),
    (r"electric piano|\brhodes\b", 4),
    (r"piano|klavier", 0),
    (r"\borgan|\borgano\b|\borgel", 19),
    (r"\bharp\b", 46),
    (r"guitar|\blute\b|\bliuto\b|theorbo", 24),
    (r"piccolo", 72),
    (r"recorder|flauto dolce|blockfl", 74),
    (r"flute|flauto|traverso|\bflote", 73),
    (r"english horn|cor anglais|oboe da caccia", 69),
    (r"\boboe|hautbois", 68),
    (r"clarinet|klarinet", 71),
    (r"bassoon|fagott", 70),
    (r"trumpet|tromba|tromp|clarino|cornet", 56),
    (r"trombone|posaune", 57),
    (r"\btuba\b", 58),
    (r"\bhorn|\bcorno\b|\bcorni\b", 60),
    (r"timpani|\btimp\b|pauken", 47),
    (r"mezzo", 41),
    (r"soprano|\bsopran|\bcantus\b|\bcanto\b|superius|discantus|treble", 40),
    (r"\balto\b|\balt\b|\baltus\b|contralto|countertenor", 41),
    (r"\btenor\b|\btenore\b", 42),
    (r"\bbass\b|\bbassus\b|\bbasso\b|bariton|\bbarit\b", 43),
    (r"quint|\bsext|septim|vagans|contratenor|triplum|motetus|voice|\bvox\b|choir|chorus"
     r"|\bcoro\b|vocal|\bsolo\b|gesang|stimme", None),
)  # fmt: skip
_NAME_PATTERNS = tuple((re.compile(pattern), program) for pattern, program in NAME_RULES)


def _normalise(name: str) -> str:
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^a-z]+", " ", plain.lower()).split())


def name_program(name: str) -> tuple[bool, int | None]:
    """``(matched, program)`` for a part or instrument name; program None = range rule."""
    text = _normalise(name)
    for pattern, program in _NAME_PATTERNS:
        if text and pattern.search(text):
            return True, program
    return False, None


def range_program(mean_pitch: float | None) -> int:
    """The voice (40/41/42/43) of a part's mean MIDI pitch; 40 for an empty part."""
    if mean_pitch is None:
        return RANGE_PROGRAMS[0][1]
    for bound, program in RANGE_PROGRAMS:
        if mean_pitch >= bound:
            return program
    return LOW_PROGRAM


@dataclass(frozen=True)
class PartInfo:
    """What :func:`assign_programs` looks at in one part."""

    name: str
    instrument_name: str = ""
    midi_program: int | None = None
    mean_pitch: float | None = None
    staff: bool = False  # one staff of a multi-staff instrument (music21 PartStaff)


def assign_programs(parts: Sequence[PartInfo], vocal: bool = False) -> list[tuple[int, str]]:
    """``(program, rule)`` per part by the rules of the module docstring."""
    return [_program(part, len(parts), vocal) for part in parts]


def _program(part: PartInfo, n_parts: int, vocal: bool) -> tuple[int, str]:
    matched, program = name_program(part.name)
    if matched:
        return (program, "name") if program is not None else (range_program(part.mean_pitch),
                                                              "range")
    if not vocal:
        matched, program = name_program(part.instrument_name)
        if matched:
            if program is None:
                return range_program(part.mean_pitch), "range"
            return program, "instrument"
        midi = part.midi_program
        if midi is not None and 0 <= midi < 128 and representation.PROGRAM_INSTRUMENT_MAP[midi]:
            return midi, "midi"
        if part.staff:
            return STAFF_PROGRAM, "staff"
        if n_parts == 1:
            return MELODY_PROGRAM, "melody"
    return range_program(part.mean_pitch), "range"
