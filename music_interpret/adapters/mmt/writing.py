"""Writing an MMT notes dataset folder safely (shared by the demo and the corpus builds).

The folder is written in a temporary sibling and renamed into place. An existing folder
is replaced only when its ``notes/sources.json`` names the same generator, i.e. when it
is a previous build of the same command.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import UserError
from . import representation
from .dataset import CSV_HEADER, NAMES_FILE, SOURCES_FILE


def csv_text(notes: np.ndarray) -> str:
    """Notes as MMT's CSV (``np.savetxt(fmt='%d', delimiter=',')`` with the header)."""
    lines = [CSV_HEADER, *(",".join(str(int(v)) for v in row) for row in notes)]
    return "\n".join(lines) + "\n"


def _names_text(names: Sequence[str]) -> str:
    return "".join(f"{name}\n" for name in names)


def _write_folder(
    folder: Path,
    songs: Sequence[tuple[str, np.ndarray]],
    splits: dict[str, tuple[str, ...]],
    sources: dict,
) -> None:
    notes_dir = folder / "notes"
    notes_dir.mkdir(parents=True)
    for name, notes in songs:
        np.save(notes_dir / f"{name}.npy", notes)
        (notes_dir / f"{name}.csv").write_text(csv_text(notes), encoding="utf-8")
    encoding = json.dumps(representation.get_encoding())
    (notes_dir / "encoding.json").write_text(encoding, encoding="utf-8")
    (notes_dir / NAMES_FILE).write_text(_names_text([n for n, _ in songs]), encoding="utf-8")
    for split, names in splits.items():
        (notes_dir / f"{split}-names.txt").write_text(_names_text(names), encoding="utf-8")
    text = json.dumps(sources, indent=2) + "\n"
    (notes_dir / SOURCES_FILE).write_text(text, encoding="utf-8")


def check_replaceable(final: Path, generator: str) -> None:
    """Raise ``UserError`` unless ``final`` is absent or a previous build by ``generator``
    (its ``notes/sources.json`` names it): a build never replaces a folder it did not make."""
    if not final.exists() and not final.is_symlink():
        return
    marker = final / "notes" / SOURCES_FILE
    try:
        previous = json.loads(marker.read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError, AttributeError):
        previous = None
    if final.is_symlink() or not final.is_dir() or previous != generator:
        raise UserError(
            f"{final} exists and is not a previous build of {generator} (its {marker.name}"
            f" does not name it); remove it or choose another --out or --dataset-name"
        )


def write_dataset(
    final: Path,
    generator: str,
    songs: Sequence[tuple[str, np.ndarray]],
    splits: dict[str, tuple[str, ...]],
    sources: dict,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the dataset in a temporary sibling of ``final``, then rename it into place.

    ``extra`` maps file names to texts written at the top of the folder.
    """
    check_replaceable(final, generator)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset is not
        _write_folder(tmp, songs, splits, sources)
        for file_name, text in (extra or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        check_replaceable(final, generator)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        old.rmdir()
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old)
