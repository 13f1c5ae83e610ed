"""``data.format: midi|musicxml|auto``: the pipeline's data folder converted once by
:mod:`.import_notes` into a cached notes dataset.

The dataset is ``<cache_dir>/<folder name>_notes`` (the engine passes ``<run>/imported``)
with ``import_report.json`` and a completion marker ``.import.json`` holding the
fingerprint of the input files (relative path, size, sha256) and of the conversion
(format, split, this package's version). A dataset with the same fingerprint is reused;
one with our marker and another fingerprint is replaced; a folder without it is never
touched. Files that cannot be converted are listed in the report, not fatal; the run
stops (one line) only when no file converts. The split is MMT's ``split.py`` defaults
(10 % valid, 10 % test, seed 0).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...jsonio import dumps, fingerprint
from ...version import __version__
from .dataset import NAMES_FILE
from .import_notes import (
    DEFAULT_FRACTION,
    REPORT_FILE,
    check_converted,
    convert_songs,
    find_sources,
    import_report,
    song_names,
    write_import,
)
from .import_songs import MIDI_SUFFIXES, MUSICXML_SUFFIXES

GENERATOR = "music_interpret.adapters.mmt.data_import"
MARKER = ".import.json"
SUFFIXES = {"midi": MIDI_SUFFIXES, "musicxml": MUSICXML_SUFFIXES,
            "midi+musicxml": MIDI_SUFFIXES + MUSICXML_SUFFIXES}
SPLIT = {"valid_fraction": DEFAULT_FRACTION, "test_fraction": DEFAULT_FRACTION, "seed": 0}


def is_notes_layout(folder: Path) -> bool:
    """Whether ``folder`` looks like an MMT notes dataset (``notes/``, ``names.txt`` or ``.npy`` files)."""
    return ((folder / "notes").is_dir() or (folder / NAMES_FILE).is_file()
            or any(folder.glob("*.npy")))


def data_format(path: Path, format: str) -> str:
    """``notes``, ``midi``, ``musicxml`` or ``midi+musicxml`` for the folder ``path``
    (``auto``: a notes dataset as it is, else the music files' extensions)."""
    folder = Path(path)
    if format == "notes":
        return "notes"
    if format == "auto" and is_notes_layout(folder):
        return "notes"
    try:
        files = find_sources([folder], SUFFIXES.get(format, SUFFIXES["midi+musicxml"]))
    except UserError as exc:
        if format != "auto":
            raise
        raise UserError(f"{folder}: neither an MMT notes dataset nor a folder of music files "
                        f"({'/'.join(SUFFIXES['midi+musicxml'])})") from exc
    if format != "auto":
        return format
    midi = [p.suffix.lower() in MIDI_SUFFIXES for p in files]
    return "midi" if all(midi) else "musicxml" if not any(midi) else "midi+musicxml"


def input_fingerprint(folder: Path, files: list[Path], format: str, cache: Path | None = None) -> str:
    """sha256 over the files' relative paths, sizes and contents and the conversion options.

    ``cache``: a hash cache file (:class:`~music_interpret.hashing.InputHasher`): files whose
    size, times, inode and device are unchanged since the last run are not read again.
    """
    from ...hashing import InputHasher

    hasher = InputHasher(cache) if cache is not None else None
    entries = []
    for path in files:
        if hasher is not None:
            digest = hasher.file(path)
        else:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        entries.append([str(path.relative_to(folder)), path.stat().st_size, digest])
    if hasher is not None and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        hasher.save()
    return fingerprint({"generator": GENERATOR, "version": __version__, "format": format,
                        "split": SPLIT, "files": entries})


def _marker(final: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((final / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("generator") == GENERATOR else None


def import_data(path: Path, format: str, cache_dir: Path, workers: int | None = None) -> Path:
    """The notes dataset converted from the music files of ``path`` (built or reused)."""
    folder = Path(path).resolve()
    files = find_sources([folder], SUFFIXES[format])
    slug = re.sub(r"[^a-z0-9_-]+", "_", folder.name.lower()).strip("_") or "data"
    final = Path(cache_dir) / f"{slug}_notes"
    fp = input_fingerprint(folder, files, format, Path(cache_dir) / f".{slug}.hash-cache.json")
    marker = _marker(final)
    if marker is not None and marker.get("fingerprint") == fp:
        print(f"data: {final} is the conversion of {folder} (unchanged), reused", file=sys.stderr)
        return final
    if (final.exists() or final.is_symlink()) and marker is None:
        raise UserError(f"data.path: {final} exists and is not a conversion of a data folder "
                        f"(no {MARKER}); refusing to replace it: move it away")
    songs, statuses = convert_songs(files, song_names(files), workers=workers, desc=f"data {folder.name}")
    report = import_report(statuses)
    check_converted(report, f"data.path {folder}")
    stamp = {"generator": GENERATOR, "fingerprint": fp, "source": str(folder), "format": format}
    write_import(final, songs, report, SPLIT["valid_fraction"], SPLIT["test_fraction"], SPLIT["seed"],
                 generator=GENERATOR, extra={MARKER: dumps(stamp)})
    refused = (f"; {report['refused']} refused, see {final / REPORT_FILE}" if report["refused"] else "")
    print(f"data: converted {report['converted']} of {report['files']} files from {folder} "
          f"into {final}{refused}", file=sys.stderr)
    return final
