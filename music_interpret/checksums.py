"""Checksums of written files (``"<algorithm>:<hex>"``): xxh3-128 when the ``xxhash``
package is installed (several GB/s), else sha256. A recorded checksum names its
algorithm, so either kind can be verified later."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

BLOCK = 8 << 20


def _hasher(algorithm: str) -> Callable[[], Any] | None:
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            return None
        return xxhash.xxh3_128
    if algorithm in hashlib.algorithms_available:
        return lambda: hashlib.new(algorithm)
    return None


def default_algorithm() -> str:
    return "xxh3_128" if _hasher("xxh3_128") is not None else "sha256"


def file_checksum(path: Path, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex digest>"`` of the file's bytes."""
    algorithm = algorithm or default_algorithm()
    make = _hasher(algorithm)
    if make is None:
        raise UserError(f"checksum algorithm {algorithm!r} is not available here "
                        "(pip install xxhash for xxh3_128)")
    h = make()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return f"{algorithm}:{h.hexdigest()}"


def checksum_matches(path: Path, recorded: str) -> bool:
    """True when ``path`` still has the ``recorded`` checksum."""
    algorithm, _, _ = recorded.partition(":")
    return file_checksum(path, algorithm) == recorded
