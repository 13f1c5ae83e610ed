"""Reading side of the ``netcdf`` store: :class:`StoreInfo`, its :class:`StoreReader`.

:func:`check_store` validates the manifest, the song table and every shard and returns
the reader. All reads go through h5py (:mod:`.h5`). Stores of format 1 (song table in
``store.json`` and in every shard, activations always float32) read the same way as
format 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checksums import checksum_matches
from ..doors import EventVocabulary, ShardInfo
from ..errors import UserError
from . import schema
from .h5 import (  # noqa: F401 - re-exported
    H5_LOCK,
    NC_LOCK,
    _text,
    open_h5,
    read_block,
    read_coords,
    shard_variable,
)
from .reader import BlockSource, StoreReader
from .schema import (  # noqa: F401 - re-exported
    COORD_CHUNK_FACTOR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    SONGS_FILE,
)

if TYPE_CHECKING:
    import xarray as xr

    from ..rowmaps import MappedShard


@dataclass(frozen=True)
class StoreInfo(StoreReader):
    """A checked ``netcdf`` store: manifest plus the shard files, in order."""

    path: Path
    manifest: dict[str, Any]
    shards: tuple[Path, ...]

    @property
    def store_name(self) -> str:
        return "netcdf"

    @property
    def store_id(self) -> str:
        return str(self.manifest.get("store_id", ""))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.manifest.get("attrs") or {})

    @property
    def digest(self) -> str | None:
        import hashlib

        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.manifest.get("summary") or {})

    @cached_property
    def shard_table(self) -> list[ShardInfo]:
        out, start = [], 0
        for k, entry in enumerate(self.manifest["shards"]):
            n = int(entry["tokens"])
            out.append(ShardInfo(k, n, start, int(entry.get("song_start", 0)),
                                 int(entry.get("song_stop", 0))))
            start += n
        return out

    @cached_property
    def vocabulary(self) -> EventVocabulary:
        from ..vocabulary import store_vocabulary

        return store_vocabulary(self.attrs)

    def read_coords(self, shard: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return read_coords(self.shards[shard], names)

    def blocks(self, hook: str, lock: Any = None) -> BlockSource:
        from .blocks import BlockReader

        return BlockReader(self.shards, self.hook_index(hook), self.d_model,
                           int(self.manifest.get("chunk_tokens", 4096)), lock=lock)

    def open_dataset(self, hooks: Sequence[str] | None = None, *, lazy: bool | None = None,
                     parallel: bool = False, chunk_tokens: int | None = None,
                     load_coords: bool = True) -> xr.Dataset:
        from .xrdataset import open_dataset

        return open_dataset(self, hooks, lazy=lazy, parallel=parallel, chunk_tokens=chunk_tokens,
                            load_coords=load_coords)

    def writer_options(self) -> dict[str, Any]:
        return {"chunk_tokens": int(self.manifest.get("chunk_tokens", 4096))}

    def map_shards(self) -> list[MappedShard]:
        from .mapped import map_store

        return map_store(self)

    @property
    def format_version(self) -> int:
        return int(self.manifest.get("format_version", 1))

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        """Stored precision of the activations (float32, float16, bfloat16)."""
        return str(self.manifest.get("dtype", "float32"))

    @property
    def variable(self) -> str:
        """Name of the stored activation variable in the shards."""
        return str(self.manifest.get("variable", schema.variable(self.dtype)))

    @property
    def n_tokens(self) -> int:
        return int(sum(s["tokens"] for s in self.manifest["shards"]))

    @cached_property
    def _song_table(self) -> tuple[list[str], list[str]]:
        m = self.manifest
        if self.format_version < 2:
            return list(m["songs"]), list(m.get("song_sources", [""] * len(m["songs"])))
        return read_song_table(self.path / m.get("songs_file", SONGS_FILE), int(m["n_songs"]))

    @property
    def songs(self) -> list[str]:
        return list(self._song_table[0])

    @property
    def song_sources(self) -> list[str]:
        return list(self._song_table[1])

    def hook_index(self, hook: str) -> int:
        """Position of ``hook`` in the hook dimension; UserError naming the hooks that exist."""
        if hook not in self.manifest["hooks"]:
            raise UserError(f"{self.path}: hook point {hook!r} was not extracted "
                            f"(extracted: {', '.join(self.manifest['hooks'])})")
        return self.manifest["hooks"].index(hook)


def read_song_table(path: Path, n_songs: int | None = None) -> tuple[list[str], list[str]]:
    """(song names, song sources) of a ``songs.nc``; UserError naming the file if it is bad."""
    try:
        with H5_LOCK, open_h5(path) as f:
            names = [str(s) for s in f["song_name"].asstr()[:]]
            sources = [str(s) for s in f["song_source"].asstr()[:]]
    except FileNotFoundError:
        raise UserError(f"{path}: the store's song table is missing") from None
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: unreadable song table ({str(exc).splitlines()[0]})") from None
    if n_songs is not None and len(names) != n_songs:
        raise UserError(f"{path}: holds {len(names)} songs, {MANIFEST} says {n_songs}")
    return names, sources


def check_store(path: Path | str, require_complete: bool = True, verify_shards: bool = True,
                verify_checksums: bool = False) -> StoreInfo:
    """Validate a store folder; every problem is a one-line UserError naming the file.

    ``verify_shards`` opens every shard and checks its identity and sizes against the
    manifest; ``verify_checksums`` also reads every shard's bytes and compares them with
    the checksum recorded when it was written (stores written before checksums existed
    have none to compare).
    """
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"{path}: activation store folder not found")
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: not an activation store (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest_path}: unreadable store manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path}: not a {FORMAT} manifest")
    version = manifest.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise UserError(f"{manifest_path}: store format {version} is newer than this version of "
                        f"music-interpret reads (up to {FORMAT_VERSION}); upgrade music-interpret")
    if manifest.get("dtype", "float32") not in schema.DTYPES:
        raise UserError(f"{manifest_path}: dtype {manifest.get('dtype')!r} is not one of "
                        f"{', '.join(schema.DTYPES)}")
    if require_complete and not manifest.get("complete"):
        raise UserError(f"{path}: the store is incomplete (extraction did not finish; rerun it to resume)")
    if not manifest["shards"]:
        raise UserError(f"{path}: the store has no shards")
    shards = tuple(path / s["file"] for s in manifest["shards"])
    info = StoreInfo(path, manifest, shards)
    if verify_shards or verify_checksums:
        if info.format_version >= 2 and not (path / manifest.get("songs_file", SONGS_FILE)).exists():
            raise UserError(f"{path / SONGS_FILE}: the store's song table is missing")
        for entry, shard in zip(manifest["shards"], shards, strict=True):
            _check_shard(shard, entry, info)
            recorded = entry.get("checksum")
            if verify_checksums and recorded and not checksum_matches(shard, recorded):
                raise UserError(f"{shard}: the file changed after it was written (checksum "
                                f"mismatch with {MANIFEST}); extract the store again")
    return info


def _check_shard(shard: Path, entry: Mapping[str, Any], info: StoreInfo) -> None:
    manifest = info.manifest
    if not shard.exists():
        raise UserError(f"{shard}: shard listed in {MANIFEST} is missing")
    try:
        with H5_LOCK, open_h5(shard) as f:
            store_id = _text(f.attrs.get("store_id"))
            hooks = _text(f.attrs.get("hook_points"))
            shape = f[info.variable].shape
    except (OSError, KeyError, RuntimeError) as exc:
        raise UserError(f"{shard}: corrupt or truncated shard ({str(exc).splitlines()[0]})") from None
    if store_id != manifest["store_id"]:
        raise UserError(f"{shard}: shard belongs to another store (store_id {store_id})")
    listed = hooks.split() if hooks is not None else None
    if listed != list(manifest["hooks"]):
        raise UserError(f"{shard}: hook points {listed} disagree with the store's {manifest['hooks']}")
    if shape[2] != manifest["d_model"]:
        raise UserError(f"{shard}: d_model {shape[2]} disagrees with the store's {manifest['d_model']}")
    if shape[0] != entry["tokens"]:
        raise UserError(f"{shard}: holds {shape[0]} tokens, the manifest says {entry['tokens']}")
