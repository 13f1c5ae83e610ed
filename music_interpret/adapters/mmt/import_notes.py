"""Import your own MIDI and MusicXML files as an MMT notes dataset (a ``data.path`` folder).

``python -m music_interpret.adapters.mmt.import_notes SRC... --out DIR`` converts each file
(folders are searched recursively for ``.mid``/``.midi``/``.musicxml``/``.mxl``/``.xml``)
and writes ``DIR/<dataset-name>_notes/notes/`` in the layout of the demo build
(:mod:`.demo_data`): ``<name>.npy``/``.csv``, ``encoding.json``, ``names.txt``,
``{train,valid,test}-names.txt`` and ``sources.json``, plus ``import_report.json`` at the
top: each file's status (``converted`` or ``refused``, with its category and reason) and
the counts by category. How one file is converted: :mod:`.import_songs`.

A file that cannot be converted is recorded in the report and the others are converted;
the command fails (one line, exit status 2) only when no file converts, or, with
``--strict``, at the first file that does not (in file order; nothing is written then).
Files are converted in a process pool (``--workers``, default: the CPU count); the
output does not depend on the number of workers. Songs longer than the model's
``max_beat`` are kept whole; the pipeline covers them with windows (:mod:`.windows`). The
split is MMT's ``split.py``: ``random.seed(seed)``, ``random.sample(names, n_valid +
n_test)``, valid first, with ``n = int(len(names) * fraction)``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from ...errors import UserError
from ...jsonio import dumps
from ...resources import usable_cpus
from .dataset import SPLITS
from .import_songs import (
    MIDI_SUFFIXES,
    MUSICXML_SUFFIXES,
    ImportedSong,
    SongRefused,
    describe,
    import_song,
)
from .music21_read import MAX_BEATS, MIN_BEATS, MIN_NOTES, RESOLUTION
from .writing import write_dataset

GENERATOR = "music_interpret.adapters.mmt.import_notes"
REPORT_FILE = "import_report.json"
DEFAULT_FRACTION = 0.1  # MMT's split.py default for valid and test
_DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class ImportResult(NamedTuple):
    """What :func:`import_files` wrote."""

    folder: Path
    songs: list[ImportedSong]
    splits: dict[str, tuple[str, ...]]
    report: dict[str, Any]


# --------------------------------------------------------------------------- files


def find_sources(sources: Sequence[Path],
                 suffixes: Sequence[str] = MIDI_SUFFIXES + MUSICXML_SUFFIXES) -> list[Path]:
    """The music files named or found (recursively, sorted) in folders, each once."""
    suffixes = tuple(suffixes)
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


def _convert(job: tuple[str, str]) -> tuple[ImportedSong | None, dict[str, Any]]:
    """Convert one file (runs in a worker): the song, or None and why it was refused."""
    path = Path(job[0])
    try:
        song = import_song(path, job[1])
    except SongRefused as exc:
        return None, {"status": "refused", "category": exc.category, "reason": str(exc)}
    except Exception as exc:  # one file's failure, whatever it is, is recorded, not fatal
        return None, {"status": "refused", "category": "error", "reason": f"{path}: {describe(exc)}"}
    return song, {"status": "converted"}


def convert_songs(paths: Sequence[Path], names: Sequence[str], *, strict: bool = False,
                  workers: int | None = None, desc: str = "import"
                  ) -> tuple[list[ImportedSong], list[dict[str, Any]]]:
    """Convert ``paths`` as songs ``names``: (songs converted, one status per file), both in
    file order. ``strict``: raise the first refusal (in file order) as a ``UserError``."""
    from tqdm.auto import tqdm

    jobs = [(str(p), n) for p, n in zip(paths, names, strict=True)]
    count = max(1, min(workers or usable_cpus(), len(jobs)))
    songs: list[ImportedSong] = []
    statuses: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=None, dynamic_ncols=True)
    executor = None
    try:
        if count == 1:
            results: Any = map(_convert, jobs)
        else:  # spawn: no fork of a parent that may hold torch's threads
            executor = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
            results = executor.map(_convert, jobs)
        for (path, name), (song, status) in zip(jobs, results, strict=True):
            bar.update()
            if song is None and strict:
                raise UserError(status["reason"])
            statuses.append({"source": path, "song": name if song else None, **status})
            if song is not None:
                songs.append(song)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return songs, statuses


def import_report(statuses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The import report: counts by category (``converted`` or a refusal's) and every file."""
    counts = Counter(s.get("category", "converted") for s in statuses)
    converted = counts.pop("converted", 0)
    return {"generator": GENERATOR, "files": len(statuses), "converted": converted,
            "refused": len(statuses) - converted, "counts": dict(sorted(counts.items())),
            "statuses": list(statuses)}


def check_converted(report: dict[str, Any], what: str) -> None:
    """``UserError`` (one line) when no file of ``what`` converted."""
    if report["converted"]:
        return
    statuses = report["statuses"]
    if len(statuses) == 1:
        raise UserError(statuses[0]["reason"])
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    raise UserError(f"{what}: none of the {len(statuses)} files could be converted ({counts}); "
                    f"first: {statuses[0]['reason']}")


def write_import(final: Path, songs: Sequence[ImportedSong], report: dict[str, Any],
                 valid_fraction: float, test_fraction: float, seed: int,
                 generator: str = GENERATOR, extra: dict[str, str] | None = None
                 ) -> dict[str, tuple[str, ...]]:
    """Write the converted ``songs`` and the report as the dataset ``final``; returns the splits."""
    splits = mmt_split([s.name for s in songs], valid_fraction, test_fraction, seed)
    sources_json = _sources(songs, splits, valid_fraction, test_fraction, seed)
    sources_json["generator"] = generator
    files = {REPORT_FILE: dumps(report), **(extra or {})}
    write_dataset(final, generator, [(s.name, s.notes) for s in songs], splits, sources_json, files)
    return splits


def import_files(sources: Sequence[Path], out: Path, dataset_name: str = "imported",
                 valid_fraction: float = DEFAULT_FRACTION, test_fraction: float = DEFAULT_FRACTION,
                 seed: int = 0, *, strict: bool = False, workers: int | None = None) -> ImportResult:
    """Convert ``sources`` and write ``out/<dataset_name>_notes`` with its import report."""
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise UserError(f"dataset name {dataset_name!r} must match [a-z0-9][a-z0-9_-]*")
    check_fractions(valid_fraction, test_fraction)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    final = out / f"{dataset_name}_notes"
    paths = find_sources(sources)
    if final.exists() and any(_inside(p, final) for p in paths):
        raise UserError(f"{final} holds input files; choose another --out or --dataset-name")
    songs, statuses = convert_songs(paths, song_names(paths), strict=strict, workers=workers,
                                    desc=f"import {dataset_name}")
    report = import_report(statuses)
    check_converted(report, ", ".join(map(str, sources)))
    splits = write_import(final, songs, report, valid_fraction, test_fraction, seed)
    return ImportResult(final, songs, splits, report)


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
    parser.add_argument("--workers", type=int, default=None,
                        help="conversion processes (default: the CPU count)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first file that cannot be converted (nothing is written)")
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    final, songs, splits, report = import_files(
        args.sources, args.out, args.dataset_name, args.valid_fraction, args.test_fraction,
        args.seed, strict=args.strict, workers=args.workers)
    counts = ", ".join(f"{split} {len(splits[split])}" for split in SPLITS)
    notes = sum(len(s.notes) for s in songs)
    refused = ""
    if report["refused"]:
        why = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
        refused = f"; {report['refused']} file(s) refused ({why}): see {final / REPORT_FILE}"
    print(f"{args.dataset_name}: wrote {len(songs)} songs ({counts}; {notes} notes) to {final}{refused}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; one line and exit status 2 on a bad option or when no file converts."""
    from ...seedcli import guarded_main

    return guarded_main(_run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
