"""Build MMT notes datasets offline from the corpus bundled with music21 (no network, no muspy).

Chorales come from ``music21.corpus.chorales.Iterator()`` in its order; a chorale is kept
when its ``.mxl`` file (the one whose name matches the iterator entry exactly) has exactly
the parts Soprano/Alto/Tenor/Bass, mapped to programs 40/41/42/43 as in the test fixtures.
With ``--quartets`` the Haydn/Mozart/Beethoven string quartet movements (``.mxl``, parts
violin/violin/viola/cello -> programs 40/40/41/42) are written as a second dataset; they
take minutes, and differ from muspy's reading (see ``QUARTET_NOTE``).

Conversion follows MMT's ``convert_sod.py`` + ``extract.py`` at resolution 12: repeats are
expanded (as muspy 0.5.0 does), ties merged, chords split, grace notes and rests dropped;
onset and duration are rounded to ticks separately (zero durations become 1); songs ending
before beat 40 or after beat 8000 and songs with fewer than 50 notes are dropped; rows
``(beat, position, pitch, duration, program)`` are de-duplicated and sorted, then the first
note's beat is shifted to 0. For all 24 fixture chorales the output equals MMT's files.
(The fixture build took the ``.krn`` twin of bwv277/bwv281; here their ``.mxl`` is used, so
bwv277 is song 13 and ``--limit 24`` ends at bwv308 instead of bwv32_6.)

Output: ``<out>/<dataset>_notes/notes/`` with ``<name>.npy``, ``<name>.csv``,
``encoding.json``, ``names.txt``, ``{train,valid,test}-names.txt`` and ``sources.json``.
The folder is built in a temporary sibling and renamed into place, replacing a previous
build of the same command; any other existing folder is refused (``check_replaceable``).
The split ranks songs by ``sha256("<seed>:<name>")``: the first ``round(0.1 n)`` are test,
the next ``round(0.1 n)`` valid (each at least 1 when n >= 3), the rest train; every list
keeps ``names.txt`` order. Output bytes depend only on the options and music21's corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from .dataset import SPLITS
from .meters import score_meters, shift_meters
from .music21_read import (  # noqa: F401 - re-exported
    _DATASET_NAME,
    MAX_BEATS,
    MIN_BEATS,
    MIN_NOTES,
    RESOLUTION,
    SPLIT_FRACTION,
    _music21,
    corpus_root,
    mmt_filter,
    score_notes,
)
from .writing import check_replaceable, write_dataset

CHORALE_PROGRAMS = {"Soprano": 40, "Alto": 41, "Tenor": 42, "Bass": 43}
QUARTET_COMPOSERS = ("haydn", "mozart", "beethoven")
QUARTET_PROGRAMS = (40, 40, 41, 42)
QUARTET_NOTE = (
    "Quartets differ from MMT/muspy 0.5.0 files: muspy keeps grace notes with their written"
    " duration (haydn_op1no1_m1 differs only by those 4 notes) and orders repeated measures"
    " differently from music21's expandRepeats in some movements; 4 movements cannot be"
    " expanded by music21 and are skipped."
)
GENERATOR = "music_interpret.adapters.mmt.demo_data"


@dataclass(frozen=True)
class Song:
    """One converted song ready to be written."""

    name: str
    corpus_path: str
    parts: tuple[tuple[str, int], ...]
    notes: np.ndarray
    meters: tuple[tuple[float, int, int], ...] = ()  # on the song's beat axis (see meters.py)

    @property
    def n_beats(self) -> int:
        return int(self.notes[-1, 0]) + 1


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_dataset` wrote."""

    path: Path
    names: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    skipped: tuple[tuple[str, str], ...]
    seconds: float


# --------------------------------------------------------------------------- conversion


def _quartet_program(part_name: str) -> int | None:
    lowered = part_name.lower()
    if "cello" in lowered:
        return 42
    if "viola" in lowered:
        return 41
    if "violin" in lowered:
        return 40
    return None


def chorale_programs(part_names: Sequence[str]) -> list[int] | None:
    """Programs for a Soprano/Alto/Tenor/Bass score, else None."""
    if sorted(part_names) != sorted(CHORALE_PROGRAMS):
        return None
    return [CHORALE_PROGRAMS[name] for name in part_names]


def quartet_programs(part_names: Sequence[str]) -> list[int] | None:
    """Programs for a violin/violin/viola/cello score, else None."""
    programs = [_quartet_program(name) for name in part_names]
    if None in programs or sorted(programs) != sorted(QUARTET_PROGRAMS):  # type: ignore[type-var]
        return None
    return programs  # type: ignore[return-value]


def convert(
    path: Path, name: str, programs_for: Callable[[Sequence[str]], list[int] | None]
) -> tuple[Song | None, str]:
    """Convert one corpus file; returns (song, "") or (None, reason it was skipped)."""
    music21 = _music21()
    rel = path.relative_to(corpus_root()).as_posix()
    try:
        score = music21.converter.parse(path, forceSource=True)
    except Exception as exc:  # music21 raises many types on odd files
        return None, f"music21 cannot parse it ({type(exc).__name__})"
    part_names = [str(part.partName or "") for part in score.parts]
    programs = programs_for(part_names)
    if programs is None:
        return None, f"parts {part_names} do not match"
    try:
        score = score.expandRepeats()
    except Exception as exc:
        return None, f"repeats cannot be expanded ({type(exc).__name__})"
    notes, end_tick = score_notes(score, programs)
    kept, reason = mmt_filter(notes, end_tick)
    if kept is None:
        return None, reason
    parts = tuple(zip(part_names, programs, strict=True))
    first_beat = int(notes[0, 0]) if len(notes) else 0  # mmt_filter shifts the notes by it
    meters = tuple(tuple(m) for m in shift_meters(score_meters(score), first_beat))
    return Song(name=name, corpus_path=rel, parts=parts, notes=kept, meters=meters), ""


# --------------------------------------------------------------------------- candidates


def song_name(corpus_path: str) -> str:
    """MMT-safe name of a corpus file: ``bach/bwv153.1.mxl`` -> ``bwv153_1``,
    ``haydn/opus1no1/movement1.mxl`` -> ``haydn_op1no1_m1``."""
    stem = corpus_path.rsplit(".", 1)[0]
    if stem.startswith("bach/"):
        stem = stem[len("bach/") :]
    stem = stem.replace("opus", "op").replace("movement", "m")
    return re.sub(r"[^a-z0-9_-]", "_", stem.lower().replace("/", "_"))


def chorale_files() -> Iterator[Path]:
    """``.mxl`` chorale files in ``chorales.Iterator()`` order (first occurrence only)."""
    music21 = _music21()
    root = corpus_root()
    seen: set[Path] = set()
    for entry in music21.corpus.chorales.Iterator(returnType="filename"):
        path = root / f"{entry}.mxl"
        if path.is_file() and path not in seen:
            seen.add(path)
            yield path


def quartet_files() -> Iterator[Path]:
    """String-quartet candidates: ``<composer>/<work>/movement*.mxl`` of Haydn/Mozart/Beethoven.

    Whole-work files (e.g. ``beethoven/opus18no4.mxl``) are left out: music21 needs minutes
    to expand their repeats and they exceed MMT's length limit or fail to expand anyway.
    """
    root = corpus_root()
    for composer in QUARTET_COMPOSERS:
        yield from sorted((root / composer).glob("*/movement*.mxl"))


# --------------------------------------------------------------------------- writing


def split_names(names: Sequence[str], seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Deterministic train/valid/test split (see module docstring); lists keep input order."""
    n = len(names)
    n_held = max(1, int(n * SPLIT_FRACTION + 0.5)) if n >= 3 else 0
    ranked = sorted(names, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    test, valid = set(ranked[:n_held]), set(ranked[n_held : 2 * n_held])
    split_of = {s: "test" if s in test else "valid" if s in valid else "train" for s in names}
    return {split: tuple(s for s in names if split_of[s] == split) for split in SPLITS}


def build_dataset(
    dataset_name: str,
    files: Sequence[Path] | Iterator[Path],
    programs_for: Callable[[Sequence[str]], list[int] | None],
    out: Path,
    limit: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Convert ``files`` in order (stopping after ``limit`` kept songs) and write the dataset."""
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise UserError(f"dataset name {dataset_name!r} must match [a-z0-9][a-z0-9_-]*")
    check_replaceable(out / f"{dataset_name}_notes", GENERATOR)
    started = time.perf_counter()
    songs: list[Song] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    root = corpus_root()
    for path in files:
        if limit is not None and len(songs) >= limit:
            break
        rel = path.relative_to(root).as_posix()
        name = song_name(rel)
        if name in taken:
            skipped.append((rel, f"name {name} already used"))
            continue
        song, reason = convert(path, name, programs_for)
        if song is None:
            skipped.append((rel, reason))
            if log:
                log(f"skip {rel}: {reason}")
            continue
        taken.add(name)
        songs.append(song)
    final = out / f"{dataset_name}_notes"
    if not songs:
        raise UserError(
            f"no song qualified for dataset {dataset_name!r}; nothing written to {final}"
        )
    splits = split_names([s.name for s in songs], seed)
    sources = _sources(songs, skipped, splits, seed)
    write_dataset(final, GENERATOR, [(s.name, s.notes) for s in songs], splits, sources)
    seconds = time.perf_counter() - started
    return BuildResult(final, tuple(s.name for s in songs), splits, tuple(skipped), seconds)


def _sources(
    songs: Sequence[Song], skipped: Sequence[tuple[str, str]], splits: dict, seed: int
) -> dict[str, Any]:
    version = _music21().__version__
    split_of = {name: split for split, names in splits.items() for name in names}
    return {
        "generator": GENERATOR,
        "corpus": "music21 bundled corpus",
        "music21_version": version,
        "resolution": RESOLUTION,
        "filters": {"min_beats": MIN_BEATS, "max_beats": MAX_BEATS, "min_notes": MIN_NOTES},
        "split": {"method": "sha256(seed:name) rank", "seed": seed, "fraction": SPLIT_FRACTION},
        "songs": {
            s.name: {
                "corpus_path": s.corpus_path,
                "music21_version": version,
                "parts": [{"part": part, "program": program} for part, program in s.parts],
                "notes": len(s.notes),
                "beats": s.n_beats,
                "meters": [list(m) for m in s.meters],
                "split": split_of[s.name],
            }
            for s in songs
        },
        "skipped": [{"corpus_path": rel, "reason": reason} for rel, reason in skipped],
    }


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m music_interpret.adapters.mmt.demo_data",
        description="Build MMT notes datasets from music21's bundled corpus (offline).",
    )
    parser.add_argument(
        "--corpus",
        choices=("chorales", "all"),
        default="chorales",
        help="chorales: the demo's four-part chorales (default); all: everything in the "
        "corpus that MMT's encoding can represent (see adapters/mmt/corpus.py; ~1 h on 2 cores)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/base"),
        help="parent folder of <dataset>_notes/ (default: data/base)",
    )
    parser.add_argument(
        "--dataset-name",
        default=None,
        help="dataset name, written to <out>/<name>_notes (default: bach, or music21 with "
        "--corpus all)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="keep at most N songs per dataset (chorales only; default: all that qualify)",
    )
    parser.add_argument(
        "--quartets",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also build the string-quartet dataset (takes about 3-4 minutes; default: no)",
    )
    parser.add_argument(
        "--quartets-name", default="quartets", help="quartet dataset name (default: quartets)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped files")
    group = parser.add_argument_group("--corpus all")
    group.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1,
        help="worker processes (default: the CPU count)",
    )
    group.add_argument(
        "--time-limit", type=float, default=600.0, metavar="SECONDS",
        help="CPU seconds allowed per file (per abc tune), and 5x that of wall clock; a "
        "task past it is recorded as a timeout (default: 600)",
    )
    group.add_argument(
        "--include", action="append", default=None, metavar="GLOB",
        help="only corpus files matching this corpus-relative glob (repeatable), e.g. "
        "'bach/bwv1*.mxl'",
    )
    group.add_argument(
        "--corpus-root", type=Path, default=None,
        help="read this folder instead of music21's bundled corpus (for tests)",
    )
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="tqdm progress bar on stderr (default: when stderr is a terminal)",
    )
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point, under the one error guard (:mod:`music_interpret.guard`)."""
    from ...guard import guarded_main

    return guarded_main(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.corpus == "all":
        return _main_all(args)
    dataset_name = args.dataset_name or "bach"
    if args.quartets and args.quartets_name == dataset_name:
        raise UserError(f"--quartets-name and --dataset-name are both {dataset_name!r}")
    jobs = [(dataset_name, chorale_files(), chorale_programs)]
    if args.quartets:
        jobs.append((args.quartets_name, quartet_files(), quartet_programs))
    for name, files, programs_for in jobs:
        result = build_dataset(name, files, programs_for, args.out, args.limit, args.seed, log)
        counts = ", ".join(f"{k} {len(v)}" for k, v in result.splits.items())
        print(
            f"{name}: wrote {len(result.names)} songs ({counts}) to {result.path}, "
            f"skipped {len(result.skipped)}, {result.seconds:.1f} s"
        )
    return 0


def _main_all(args: argparse.Namespace) -> int:
    from .corpus_build import build_corpus, stats_table

    if args.limit is not None or args.quartets:
        raise UserError("--limit and --quartets apply to --corpus chorales; use --include")
    result = build_corpus(
        args.out, args.dataset_name or "music21", args.corpus_root, args.include,
        args.workers, args.time_limit, args.seed, args.progress,
    )  # fmt: skip
    if args.verbose:
        for skip in result.skipped:
            tune = f" X:{skip.tune}" if skip.tune is not None else ""
            print(f"skip {skip.corpus_path}{tune}: {skip.category}: {skip.detail}", file=sys.stderr)
    counts = ", ".join(f"{k} {len(v)}" for k, v in result.splits.items())
    print(stats_table(result.stats))
    print(
        f"{result.path.name}: wrote {len(result.songs)} songs ({counts}) to {result.path}, "
        f"skipped {len(result.skipped)} files/tunes (see sources.json), {result.seconds:.0f} s, "
        f"{len(result.songs) / result.seconds:.2f} songs/s, peak RSS main "
        f"{result.main_peak_rss_mib:.0f} MiB, workers {result.pool.worker_peak_rss_mib:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
