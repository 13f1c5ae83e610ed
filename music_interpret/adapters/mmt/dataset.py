"""Reading MMT note datasets and splitting long code sequences into model windows.

Two layouts are understood (``<notes>`` holds ``<name>.npy`` and/or ``<name>.csv`` files):

* MMT's ``data/<ds>/processed/``: ``notes/`` (with ``encoding.json``) next to ``names.txt``
  and ``{train,valid,test}-names.txt``;
* the seed layout ``data/base/<dataset>_notes/notes/``, whose name lists and ``sources.json``
  may sit in ``notes/`` itself or in its parent.

:func:`open_dataset` accepts the processed/``<dataset>_notes`` folder or the ``notes`` folder.
Each song is an int64 array (N, 5): beat, position, pitch, duration, program.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ...doors import window_ranges
from ...errors import UserError
from ...interfaces import SongDataset
from .representation import RESOLUTION

CSV_HEADER = "beat,position,pitch,duration,program"
NOTE_COLUMNS = tuple(CSV_HEADER.split(","))
SPLITS = ("train", "valid", "test")
# the header numpy writes for a C-order 2-d integer array (``np.save`` of a notes array)
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(r"\{'descr': '([<|][iu][1248])', 'fortran_order': False, "
                         r"'shape': \((\d+), (\d+)\), \} *\n")
NAMES_FILE = "names.txt"
SOURCES_FILE = "sources.json"
ENCODING_FILE = "encoding.json"
_SUFFIXES = (".npy", ".csv")  # .npy preferred when both exist
_MAX_MIDI = 127  # pitch and program are MIDI numbers


@dataclass(frozen=True)
class NoteDataset(SongDataset):
    """A folder of MMT notes files, restricted to one split (the ``mmt`` adapter's
    :class:`~music_interpret.interfaces.SongDataset`; a song is its notes array).

    ``names`` are the songs of the selected split in list order (or sorted file names when
    no list exists). Iterating yields the names; :meth:`items` yields ``(name, notes)``.
    """

    root: Path
    notes_dir: Path
    names: tuple[str, ...]
    split: str | None = None
    sources: dict[str, Any] | None = None
    encoding_path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    @property
    def location(self) -> Path:
        """The notes folder."""
        return self.notes_dir

    def _song_info(self, name: str) -> Any:
        sources = self.sources if isinstance(self.sources, dict) else {}
        songs = sources.get("songs", sources)
        return songs.get(name) if isinstance(songs, dict) else None

    def source(self, name: str) -> str:
        """The corpus file ``sources.json`` records for the song, else the notes file."""
        info = self._song_info(name)
        if isinstance(info, dict):
            return str(info.get("corpus_path") or info.get("source") or json.dumps(info, sort_keys=True))
        return str(self.path(name))

    def meters(self, name: str) -> list[tuple[float, int, int]] | None:
        """The time signatures ``sources.json`` records for the song (``meters``), or None."""
        info = self._song_info(name)
        meters = info.get("meters") if isinstance(info, dict) else None
        return [(float(b), int(n), int(d)) for b, n, d in meters] if meters else None

    def path(self, name: str) -> Path:
        """The notes file read for ``name`` (``.npy`` if present, else ``.csv``)."""
        if name not in self.files:
            split = self.split or "all"
            raise UserError(f"song {name!r} is not in dataset {self.notes_dir} (split {split})")
        return self.files[name]

    def read(self, name: str) -> np.ndarray:
        """Notes of ``name`` as a validated int64 array (N, 5)."""
        return read_notes(self.path(name))

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, notes)`` for every song of the split, in order."""
        for name in self.names:
            yield name, self.read(name)

    def load_encoding(self) -> dict[str, Any] | None:
        """The dataset's ``encoding.json`` as a dict, or None when the folder has none."""
        if self.encoding_path is None:
            return None
        return _load_json(self.encoding_path)


# --------------------------------------------------------------------------- opening


def open_dataset(path: str | Path, split: str | None = None) -> NoteDataset:
    """Open the notes dataset at ``path`` (processed dir, ``<dataset>_notes`` dir or ``notes`` dir).

    ``split`` is None/"all" (``names.txt``, or every notes file when there is no list),
    "train", "valid" or "test" (``<split>-names.txt``, which must exist).
    """
    given = Path(path)
    if not given.exists():
        raise UserError(f"dataset folder {given} does not exist")
    if not given.is_dir():
        raise UserError(f"dataset path {given} is not a folder")
    if (given / "notes").is_dir():
        root, notes_dir = given, given / "notes"
    else:
        notes_dir = given
        root = given.parent if given.name == "notes" else given
    search = [notes_dir] if root == notes_dir else [notes_dir, root]

    if split in (None, "all"):
        split_name, list_file = None, NAMES_FILE
    elif split in SPLITS:
        split_name, list_file = split, f"{split}-names.txt"
    else:
        raise UserError(f"unknown split {split!r} for dataset {root}: use all/train/valid/test")

    list_path = _find(search, list_file)
    if list_path is None and split_name is not None:
        where = " or ".join(str(d / list_file) for d in search)
        raise UserError(f"split list {list_file} not found: looked for {where}")
    if list_path is not None:
        names = _read_name_list(list_path)
        files = {name: _song_file(notes_dir, name, list_path) for name in names}
    else:
        files = _scan_notes(notes_dir)
        names = tuple(files)
    if not names:
        source = list_path if list_path is not None else notes_dir
        raise UserError(f"dataset {source} has no songs")

    sources_path = _find(search, SOURCES_FILE)
    return NoteDataset(
        root=root,
        notes_dir=notes_dir,
        names=names,
        split=split_name,
        sources=_load_json(sources_path) if sources_path is not None else None,
        encoding_path=_find(search, ENCODING_FILE),
        files=files,
    )


def _find(folders: list[Path], filename: str) -> Path | None:
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    return None


def _read_name_list(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read name list {path}: {exc}") from None
    names: list[str] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(lines, 1):
        name = raw.strip()
        if not name:
            continue
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name:
            raise UserError(f"{path}:{lineno}: song name {name!r} must be relative, without '..'")
        if name in seen:
            raise UserError(f"{path}:{lineno}: song name {name!r} is listed twice")
        seen.add(name)
        names.append(name)
    return tuple(names)


def _song_file(notes_dir: Path, name: str, list_path: Path) -> Path:
    for suffix in _SUFFIXES:
        candidate = notes_dir / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise UserError(f"song {name!r} from {list_path} has no .npy or .csv file in {notes_dir}")


def _scan_notes(notes_dir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for suffix in reversed(_SUFFIXES):  # later suffixes overwrite: .npy wins
        for file in notes_dir.glob(f"*{suffix}"):
            if file.is_file():
                _check_utf8_name(file)
                files[file.name[: -len(suffix)]] = file
    return {name: files[name] for name in sorted(files)}


def _check_utf8_name(file: Path) -> None:
    """Song names are stored as text: refuse a file name that is not valid UTF-8."""
    try:
        file.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(file.name).decode("utf-8", "backslashreplace")
        raise UserError(f"notes file {file.parent / shown}: the file name is not valid UTF-8; "
                        "rename it (song names are stored as text)") from None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read JSON file {path}: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"JSON file {path} must hold an object, not {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- reading


def read_notes(path: str | Path) -> np.ndarray:
    """Read one ``.npy`` or ``.csv`` notes file as a validated int64 array (N, 5)."""
    path = Path(path)
    if path.suffix == ".npy":
        raw = _load_npy(path)
    elif path.suffix == ".csv":
        raw = _load_csv(path)
    else:
        raise UserError(f"notes file {path} must end in .npy or .csv")
    return validate_notes(raw, path)


def validate_notes(array: np.ndarray, source: str | Path = "<notes>") -> np.ndarray:
    """Check an (N, 5) note array (integer values, none negative, MIDI ranges); return int64."""
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != len(NOTE_COLUMNS):
        raise UserError(f"notes file {source}: expected shape (N, 5), got {array.shape}")
    kind = array.dtype.kind
    if kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise UserError(f"notes file {source}: float values that are not whole numbers")
    elif kind not in "iu":
        raise UserError(f"notes file {source}: dtype {array.dtype} is not an integer type")
    if kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise UserError(f"notes file {source}: values too large for int64")
    notes = array.astype(np.int64)
    bad_rows, bad_cols = np.nonzero(notes < 0)
    if bad_rows.size:
        row, col = int(bad_rows[0]), int(bad_cols[0])
        raise UserError(
            f"notes file {source}: negative {NOTE_COLUMNS[col]} {notes[row, col]} in row {row}"
        )
    limits = {"position": RESOLUTION - 1, "pitch": _MAX_MIDI, "program": _MAX_MIDI}
    for name, limit in limits.items():
        col = NOTE_COLUMNS.index(name)
        over = np.nonzero(notes[:, col] > limit)[0]
        if over.size:
            row = int(over[0])
            raise UserError(
                f"notes file {source}: {name} {notes[row, col]} in row {row} exceeds {limit}"
                + (f" (onsets are in 1/{RESOLUTION} of a beat)" if name == "position" else "")
            )
    return np.ascontiguousarray(notes)


def _load_npy(path: Path) -> np.ndarray:
    try:
        plain = _load_plain_npy(path)
        return plain if plain is not None else np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read notes file {path}: {reason}") from None


def _load_plain_npy(path: Path) -> np.ndarray | None:
    """A notes ``.npy`` file as ``np.save`` writes it, read without ``np.load``'s header
    parser (a third of the read time of a small file); None for any other file."""
    with open(path, "rb") as fh:
        head = fh.read(10)
        if len(head) < 10 or head[:8] != _NPY_MAGIC:
            return None
        match = _NPY_HEADER.fullmatch(fh.read(int.from_bytes(head[8:], "little")).decode("latin1"))
        if match is None:
            return None
        shape = (int(match[2]), int(match[3]))
        array = np.fromfile(fh, np.dtype(match[1]), count=shape[0] * shape[1])
    if array.size != shape[0] * shape[1]:
        return None  # truncated: let np.load report it
    return array.reshape(shape)


def _load_csv(path: Path) -> np.ndarray:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read notes file {path}: {exc}") from None
    header = lines[0].strip() if lines else ""
    if header != CSV_HEADER:
        raise UserError(f"notes file {path}: header must be {CSV_HEADER!r}, got {header!r}")
    rows: list[list[int]] = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != len(NOTE_COLUMNS):
            raise UserError(f"notes file {path}:{lineno}: expected 5 values, got {len(fields)}")
        try:
            rows.append([int(value) for value in fields])
        except ValueError:
            raise UserError(
                f"notes file {path}:{lineno}: non-integer value in {line.strip()!r}"
            ) from None
    return np.array(rows, dtype=np.int64).reshape(-1, len(NOTE_COLUMNS))


# --------------------------------------------------------------------------- windows

#: plain code-range windows (the generic helper of :mod:`music_interpret.doors`)
windows = window_ranges


def owned_ranges(
    n_codes: int, max_seq_len: int, stride: int | None = None
) -> list[tuple[int, int]]:
    """Code ranges owned by each window of :func:`windows`; together they partition [0, n_codes).

    A code is owned by the window in which it has the most left context, i.e. the first
    window containing it: window k owns ``[end of window k-1, end of window k)`` (the first
    window owns ``[0, end)``). With the default stride every code owned by a later window
    has at least ``max_seq_len - stride`` codes of left context in it.
    """
    owned: list[tuple[int, int]] = []
    previous_end = 0
    for _, end in windows(n_codes, max_seq_len, stride):
        owned.append((previous_end, end))
        previous_end = end
    return owned
