"""Which files of music21's bundled corpus the ``--corpus all`` build reads, and how one becomes a song.

**Files** (:func:`corpus_tasks`). Every file in a folder of the corpus root is either a task
or a skip with its reason; nothing is left out silently. Read: ``.mxl``, ``.musicxml``,
``.xml``, ``.krn`` and ``.abc``. Not read: the folders ``demos`` and ``theoryExercises``
(music21's test and teaching files), Roman-numeral analyses (``.rntxt``), Finale files
(``.mus``/``.musx``, which music21 cannot read; each has an ``.xml`` twin) and anything else.
When one path stem exists in several formats only the first of ``.mxl``, ``.musicxml``,
``.xml``, ``.krn``, ``.abc`` is read (e.g. ``bach/bwv277.krn`` is the twin of
``bach/bwv277.mxl``, ``beethoven/opus18no1/movement1.krn`` of its ``.mxl``).

An ``.abc`` file holding several tunes (``X:`` lines) is split into one task per tune: the
text before the first ``X:`` line is prepended to each tune, as music21's
``splitByReferenceNumber`` does when it parses the file as an Opus, so each tune parses on
its own and a bad tune costs only itself. In ``josquin`` the tunes of a file are the voices
of one piece: the file is parsed as an Opus and its scores merged (``Opus.mergeScores``),
each part named after its voice (the tune's second ``T:`` line).

**Notes**: the demo's rules (:func:`~.demo_data.score_notes`, :func:`~.demo_data.mmt_filter`):
resolution 12, repeats expanded with music21's ``expandRepeats`` (as muspy does), ties
merged, chords split, grace notes, rests and chord symbols dropped, MMT's length filters,
sorted unique rows, first beat shifted to 0. Two additions for repeats:

* An end-repeat with no start-repeat since the previous end-repeat first gets the start
  it implies (:func:`imply_repeat_starts`): the usual convention, which music21 does not
  follow (it goes back to the beginning, so the abc idiom ``A :| B :|`` would play
  ``A A B A A B``, and a tune of eight such sections grew 64-fold in a trial). Scores
  with a start for every later end-repeat, such as all 307 demo chorales, are not
  changed. If music21 then refuses to expand the score, it is expanded as music21 reads
  it. ``sources.json`` says which, with the number of implied starts.
* A score without any measure holds no repeat mark as music21 reads it (it refuses to
  expand such a score): it is kept as written, ``"repeats": "none (no measures)"`` (Essen
  songs with ``M: none``); if it does hold repeat marks it is skipped.

A score whose repeats music21 cannot expand is skipped with music21's reason (skipping is
the demo's rule; playing it unexpanded would play first and second endings in a row). A
note whose pitch lies outside MIDI 0..127 (music21 would fold it by octaves) skips the
song. Every duration is representable: MMT's encoding snaps it to its known durations and
caps it at 384, as it does for MMT's own data.

Instruments: :mod:`.corpus_programs`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import representation
from .corpus_programs import VOCAL_SUBCORPORA, PartInfo, assign_programs
from .meters import score_meters, shift_meters
from .music21_read import _music21, mmt_filter, score_notes

FORMATS = (".mxl", ".musicxml", ".xml", ".krn", ".abc")  # twins: the first one present wins
EXCLUDED_DIRS = {
    "demos": "music21 demo/test file, not repertoire",
    "theoryExercises": "music21 theory exercise, not repertoire",
}
OTHER_SUFFIXES = {
    ".rntxt": "Roman-numeral analysis, not notes",
    ".mus": "Finale file, music21 cannot read it",
    ".musx": "Finale file, music21 cannot read it",
}
VOICE_FILE_SUBCORPORA = frozenset({"josquin"})  # abc files whose tunes are the voices of a piece
_SKIP_DIRS = {"__pycache__", "_metadataCache"}


@dataclass(frozen=True)
class Task:
    """One unit of work: a score file, one tune of an abc file, or a josquin voice file."""

    subcorpus: str
    corpus_path: str  # relative to the corpus root, posix
    path: str  # absolute
    kind: str  # "score" | "abc" | "abc-voices"
    tune: str | None = None  # abc reference number (X:), None for a whole file
    ordinal: int = 0  # position of the tune in its file
    text: str | None = None  # abc text of the tune (kind "abc")
    work: str | None = None  # work key: songs sharing it stay in one split

    @property
    def label(self) -> str:
        return self.corpus_path + (f" X:{self.tune}" if self.tune is not None else "")


@dataclass(frozen=True)
class Skip:
    """A file or tune not in the dataset: a short category and a detail."""

    corpus_path: str
    category: str
    detail: str
    tune: str | None = None
    ordinal: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"corpus_path": self.corpus_path}
        if self.tune is not None:
            out["tune"] = self.tune
        out.update(category=self.category, reason=self.detail)
        return out


@dataclass(frozen=True)
class Converted:
    """A converted song (before naming and de-duplication)."""

    notes: np.ndarray
    parts: tuple[tuple[str, int, str], ...]  # (part name, program, rule)
    repeats: str
    meters: tuple[tuple[float, int, int], ...] = ()  # on the song's beat axis (see meters.py)


# --------------------------------------------------------------------------- files


def corpus_tasks(
    root: Path, include: Sequence[str] | None = None
) -> tuple[list[Task], list[Skip]]:
    """Tasks and file-level skips for every file in a folder of ``root``, in path order.

    ``include``: glob patterns (``fnmatch``, where ``*`` also crosses folders) matched
    against the corpus-relative path; files matching none are ignored without a record.
    """
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.is_file() and len(p.relative_to(root).parts) > 1
        and not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )  # fmt: skip
    if include:
        files = [(rel, p) for rel, p in files if any(_matches(rel, pat) for pat in include)]
    stems = {rel.rsplit(".", 1)[0] + p.suffix.lower() for rel, p in files}
    tasks: list[Task] = []
    skips: list[Skip] = []
    for rel, path in files:
        reason = _file_skip_reason(rel, path, stems)
        if reason is not None:
            skips.append(Skip(rel, *reason))
        elif path.suffix.lower() == ".abc":
            tasks.extend(_abc_tasks(rel, path))
        else:
            tasks.append(_task(rel, path, "score"))
    return tasks, skips


def _matches(rel: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(rel, pattern)


def _file_skip_reason(rel: str, path: Path, stems: set[str]) -> tuple[str, str] | None:
    top = rel.split("/", 1)[0]
    if top in EXCLUDED_DIRS:
        return "excluded", EXCLUDED_DIRS[top]
    suffix = path.suffix.lower()
    stem = rel[: len(rel) - len(path.suffix)]
    if suffix in FORMATS:
        for preferred in FORMATS[: FORMATS.index(suffix)]:
            if stem + preferred in stems:
                return "twin", f"format twin of {stem}{preferred}, which is used"
        return None
    if suffix in OTHER_SUFFIXES:
        return "format", OTHER_SUFFIXES[suffix]
    return "format", f"not a score ({suffix or 'no suffix'})"


def _task(rel: str, path: Path, kind: str, **fields: Any) -> Task:
    top = rel.split("/", 1)[0]
    return Task(top, rel, str(path), kind, work=_work_key(rel, path), **fields)


def _work_key(rel: str, path: Path) -> str | None:
    """Songs with one work key share a split: movements in ``<composer>/<work>/``, one
    cantata's chorales (``bach/bwv<n>.*``), one mass (``!!!OPR`` of a ``.krn``)."""
    parts = rel.split("/")
    if len(parts) >= 3:
        return "/".join(parts[:-1])
    match = re.match(r"bach/(bwv\d+)", rel)
    if match:
        return f"bach/{match[1]}"
    if path.suffix.lower() == ".krn":
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[:60]:
            if line.startswith("!!!OPR:"):
                return f"{parts[0]}/{line[7:].strip()}"
    return None


def split_abc(text: str) -> list[tuple[str | None, str]]:
    """``(reference number, tune text)`` per ``X:`` line; the file header goes first in each."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("X:")]
    if len(starts) <= 1:
        number = lines[starts[0]].strip()[2:].strip() if starts else None
        return [(number, text)]
    header = lines[: starts[0]]
    bounds = [*starts, len(lines)]
    return [
        (lines[a].strip()[2:].strip(), "\n".join(header + lines[a:b]))
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def _abc_tasks(rel: str, path: Path) -> list[Task]:
    if rel.split("/", 1)[0] in VOICE_FILE_SUBCORPORA:
        return [_task(rel, path, "abc-voices")]
    tunes = split_abc(path.read_text(encoding="utf-8"))
    if len(tunes) == 1:
        return [_task(rel, path, "abc", text=tunes[0][1])]
    return [
        _task(rel, path, "abc", tune=number or str(k + 1), ordinal=k, text=text)
        for k, (number, text) in enumerate(tunes)
    ]


# --------------------------------------------------------------------------- conversion


class SkipSong(Exception):
    """A song that is skipped for a reason worth recording (category, detail)."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category, self.detail = category, detail


def convert_task(task: Task) -> Converted:
    """Parse and convert one task (runs in a worker); raises :class:`SkipSong`."""
    score = _parse(task)
    if not score.parts:
        raise SkipSong("no-parts", "music21 found no parts")
    infos = [_part_info(part) for part in score.parts]
    programs = assign_programs(infos, vocal=task.subcorpus in VOCAL_SUBCORPORA)
    score, repeats = _expand(score)
    _check_pitches(score)
    notes, end_tick = score_notes(score, [program for program, _ in programs])
    kept, reason = mmt_filter(notes, end_tick)
    if kept is None:
        raise SkipSong(_FILTER_CATEGORY[reason.split(" ")[0]], reason)
    parts = tuple((info.name, p, rule) for info, (p, rule) in zip(infos, programs, strict=True))
    first_beat = int(notes[0, 0]) if len(notes) else 0  # mmt_filter shifts the notes by it
    meters = tuple(tuple(m) for m in shift_meters(score_meters(score), first_beat))
    return Converted(notes=kept, parts=parts, repeats=repeats, meters=meters)


_FILTER_CATEGORY = {"shorter": "too-short", "longer": "too-long", "fewer": "too-few-notes"}


def _parse(task: Task) -> Any:
    music21 = _music21()
    try:
        if task.kind == "abc":
            parsed = music21.converter.parseData(task.text, format="abc")
        else:
            parsed = music21.converter.parse(task.path, forceSource=True)
        if task.kind == "abc-voices":
            return _merge_voices(parsed)
    except Exception as exc:  # music21 raises many types on odd files
        raise SkipSong("parse-error", _describe(exc)) from None
    if isinstance(parsed, music21.stream.Opus):
        scores = list(parsed.scores)
        if len(scores) != 1:
            raise SkipSong("parse-error", f"an Opus of {len(scores)} scores in one task")
        parsed = scores[0]
    if not isinstance(parsed, music21.stream.Score):
        parsed = music21.stream.Score([parsed])
    return parsed


def _merge_voices(opus: Any) -> Any:
    scores = list(opus.scores)
    merged = opus.mergeScores()
    if len(merged.parts) == len(scores):
        for part, score in zip(merged.parts, scores, strict=True):
            part.partName = score.metadata.alternativeTitle or part.partName
    return merged


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _part_info(part: Any) -> PartInfo:
    music21 = _music21()
    inst = part.recurse().getElementsByClass(music21.instrument.Instrument).first()
    pitches = [
        p.ps
        for element in part.recurse().notes
        if not isinstance(element, music21.harmony.Harmony)
        for p in element.pitches
    ]
    return PartInfo(
        name=str(part.partName or ""),
        instrument_name=str(inst.instrumentName or "") if inst is not None else "",
        midi_program=inst.midiProgram if inst is not None else None,
        mean_pitch=statistics.fmean(pitches) if pitches else None,
        staff=isinstance(part, music21.stream.PartStaff),
    )


def imply_repeat_starts(score: Any) -> list[tuple[Any, Any]]:
    """Give every end-repeat without a start-repeat its implied start, in place.

    By the usual convention a bare end-repeat goes back to the previous end-repeat (past
    any later endings of it) or to the beginning. music21's ``expandRepeats`` always goes
    back to the beginning, so ``A :| B :|``, common in abc, would play ``A A B A A B``
    and longer tunes grow exponentially. The first section needs no mark (music21 already
    goes back to the beginning). Returns ``(measure, previous left barline)`` per mark
    added, for :func:`_undo`.
    """
    music21 = _music21()
    bracket = music21.spanner.RepeatBracket
    added: list[tuple[Any, Any]] = []
    for part in score.parts:
        measures = list(part.getElementsByClass("Measure"))
        section_start, has_start = 0, False
        for i, measure in enumerate(measures):
            if _is_repeat(measure.leftBarline, "start"):
                has_start = True
            if _is_repeat(measure.rightBarline, "end"):
                if not has_start and 0 < section_start <= i:
                    target = measures[section_start]
                    added.append((target, target.leftBarline))
                    target.leftBarline = music21.bar.Repeat(direction="start")
                has_start = False
                section_start = i + 1
            elif i == section_start and not has_start and any(
                isinstance(site, bracket) for site in measure.getSpannerSites()
            ):
                section_start = i + 1  # a later ending of the previous repeat
    return added


def _undo(added: list[tuple[Any, Any]]) -> None:
    for measure, barline in added:
        measure.leftBarline = barline


def _is_repeat(barline: Any, direction: str) -> bool:
    return getattr(barline, "direction", None) == direction and type(barline).__name__ == "Repeat"


def _expand(score: Any) -> tuple[Any, str]:
    """The score with repeats expanded (see the module docstring) and how it was done."""
    if not any(part.getElementsByClass("Measure") for part in score.parts):
        marks = score.recurse().getElementsByClass(("Repeat", "RepeatMark", "RepeatBracket"))
        if marks.first() is not None:
            raise SkipSong("repeats", "repeat marks in a score without measures")
        return score, "none (no measures)"
    added = imply_repeat_starts(score)
    if added:
        try:
            return score.expandRepeats(), f"expanded, {len(added)} implied start(s)"
        except Exception:
            _undo(added)  # music21 rejects them: fall back to its own reading
    try:
        how = "expanded" if not added else "expanded (implied starts rejected by music21)"
        return score.expandRepeats(), how
    except Exception as exc:
        raise SkipSong("repeats", f"music21 cannot expand the repeats ({_describe(exc)})") from None


def _check_pitches(score: Any) -> None:
    harmony = _music21().harmony.Harmony
    for element in score.recurse().notes:
        if isinstance(element, harmony) or element.duration.isGrace:
            continue
        for p in element.pitches:
            if not 0 <= p.ps <= 127:
                raise SkipSong("pitch-range", f"pitch {p.nameWithOctave} is outside MIDI 0..127")


# --------------------------------------------------------------------------- keys


def notes_digest(notes: np.ndarray) -> str:
    """sha256 of a note array's shape and int64 bytes (identical songs share it)."""
    array = np.ascontiguousarray(notes, dtype=np.int64)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def melody_key(notes: np.ndarray, length: int = 20) -> str | None:
    """Transposition- and tempo-invariant key of the top line's first ``length`` onsets.

    At each onset the highest pitch is taken; the key is the sequence of pitch intervals
    and of inter-onset intervals divided by their gcd. Two settings of one tune (another
    collection, another key, note values halved) usually share it. None if too short.
    """
    ticks = notes[:, 0] * representation.RESOLUTION + notes[:, 1]
    onsets, first = np.unique(ticks, return_index=True)
    if len(onsets) <= length:
        return None
    top = np.maximum.reduceat(notes[:, 2], first)[: length + 1]
    iois = np.diff(onsets[: length + 1])
    iois = iois // np.gcd.reduce(iois)
    return ",".join(f"{i}/{d}" for i, d in zip(np.diff(top), iois, strict=True))


def subcorpus_instruments(programs: Iterable[int]) -> list[str]:
    """MMT instrument names of ``programs`` in MMT's instrument-code order."""
    names = {representation.PROGRAM_INSTRUMENT_MAP[int(p)] for p in programs}
    return [name for name in representation.INSTRUMENT_NAMES[1:] if name in names]
