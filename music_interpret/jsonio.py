"""Small helpers shared by every part of the package: JSON values, fingerprints and
writes that never leave a half-written file behind.

:func:`writing` turns "no space left on device" into a one-line :class:`DiskFull`
naming the file and removes the temporaries of the failed write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DiskFull

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def fingerprint(data: Any) -> str:
    """sha256 of the canonical JSON of ``data``."""
    blob = json.dumps(to_jsonable(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


NEARLY_FULL = 1 << 20  # bytes


def free_space(path: Path | str) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, path: Path | str | None = None, need: int = NEARLY_FULL) -> bool:
    """Whether ``exc``, raised while writing ``path``, comes from a full disk.

    An ``OSError`` says so by its errno. Libraries that write through their own I/O
    (torch.save, safetensors, netCDF-C's "HDF error") lose the errno, so for any other
    exception the file system is asked: less than ``need`` bytes free means it is full.
    Call this before removing the failed write's temporaries.
    """
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    if "No space left on device" in str(exc):
        return True
    if path is None or not isinstance(exc, Exception) or isinstance(exc, DiskFull):
        return False
    free = free_space(path)
    return free is not None and free < need


@contextlib.contextmanager
def writing(path: Path | str, *temporaries: Path | str) -> Iterator[None]:
    """Around a write of ``path``: on any failure remove ``temporaries``; a full disk
    becomes ``DiskFull("no space left on device while writing <path>")``."""
    try:
        yield
    except BaseException as exc:
        full = is_disk_full(exc, path)
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFull(f"no space left on device while writing {path}") from None
        raise


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing it before the rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with writing(path, tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def dumps(data: Any) -> str:
    """The JSON text every file of the package uses (indented, newline at the end)."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename."""
    write_bytes_atomic(Path(path), dumps(data).encode("utf-8"))
