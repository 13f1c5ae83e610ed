"""sha256 of input files and folders, with a cache that skips files known to be unchanged
(the engine's stage inputs, the data import's source files)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .jsonio import write_json_atomic


class InputHasher:
    """sha256 of the contents of files and folders.

    A cache in the run folder skips re-reading a file whose size, modification time,
    change time, inode and device are all unchanged. The change time cannot be set
    back by a user (a rewrite that restores the size and modification time still
    moves it), so a changed file is always read again.
    """

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        try:
            self.cache: dict[str, Any] = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            self.cache = {}

    def file(self, path: Path, resolved: Path | None = None) -> str:
        """Hash of one file; ``resolved``: its absolute path when the caller knows it."""
        st = path.stat()
        key = os.fsencode(resolved or path.resolve()).decode("utf-8", "backslashreplace")
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        hit = self.cache.get(key)
        if isinstance(hit, list) and hit[:-1] == stamp:
            return str(hit[-1])
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        self.cache[key] = [*stamp, digest]
        return digest

    def path(self, path: Path) -> str:
        """Hash of a file, or of a folder's files (relative names and contents)."""
        if path.is_file():
            return self.file(path)
        if not path.exists():
            return "missing"
        h = hashlib.sha256()
        root = path.resolve()
        for sub in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = sub.relative_to(path)
            h.update(os.fsencode(rel))
            h.update(self.file(sub, root / rel).encode())
        return h.hexdigest()

    def save(self) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(self.cache_file, self.cache)
