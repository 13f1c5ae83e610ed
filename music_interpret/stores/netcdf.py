"""The ``netcdf`` activation store: netCDF-4 shards, a song table and ``store.json``.

Layout of a store folder (format 2)::

    store.json          manifest: hooks, d_model, dtype, shards (rewritten atomically)
    songs.nc            the song table: song_name(songs), song_source(songs), written once
    shard-00000.nc      activations(token, hook, d_model) + coordinates on token
    shard-00001.nc      ...
    stats/              written by the preprocess stage

Every shard is CF-1.10 and self-describing: an int64 index coordinate ``token``
(global over the store, so ``xarray.open_mfdataset("store/shard-*.nc")`` with default
arguments concatenates the shards in order), the per-token coordinates named in the
activations' ``coordinates`` attribute, with ``long_name``, ``units``, ``valid_min`` /
``valid_max`` and ``flag_values`` / ``flag_meanings`` where they apply
(:mod:`~music_interpret.stores.schema`). Shards are written through h5netcdf, so the
package reads and writes stores through one HDF5 library (h5py's); netCDF-C reads them
as well.

Each shard is written to ``.shard-NNNNN.nc.tmp`` and renamed when complete, then the
manifest is updated; a shard file that is not in the manifest is not part of the store.
Activations are stored uncompressed, aligned to 4 KiB: with the default ``layout:
chunked`` in chunks of ``chunk_tokens`` tokens of one hook point, with ``layout:
contiguous`` (and for a shard of fewer tokens than one chunk) as one token-major block.
Either way a shard's activations are one byte range that the training loader
memory-maps (:mod:`music_interpret.stores.mapped`). The small integer coordinates are
zlib-compressed in chunks of ``COORD_CHUNK_FACTOR * chunk_tokens`` tokens. Stores of
format 1 (song table in every shard and in ``store.json``, no ``token`` coordinate)
stay readable (:mod:`music_interpret.stores.info`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..checksums import file_checksum
from ..doors import EventVocabulary
from ..errors import DiskFull, UserError
from ..interfaces import ActivationStore
from ..jsonio import is_disk_full, write_json_atomic
from . import schema
from .h5 import H5_LOCK, NC_LOCK, read_block, read_coords  # noqa: F401 - re-exported
from .info import StoreInfo, check_store  # noqa: F401 - re-exported: the store's reading side
from .schema import (  # noqa: F401 - re-exported
    COORD_CHUNK_FACTOR,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SONGS_FILE,
    TOKEN_COORDS,
)

LAYOUTS = ("chunked", "contiguous")
ALIGN = {"alignment_threshold": 1 << 16, "alignment_interval": 4096}  # 64 KiB+ on 4 KiB


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.nc"


def part_manifest(rank: int) -> str:
    """The manifest of the shards one rank of a distributed extract has written."""
    return f".store.rank-{rank:05d}.json"


PART_GLOB = ".store.rank-*.json"


def songs_digest(songs: Sequence[str]) -> str:
    """sha256 of the song list (what a resumed extraction must agree on)."""
    return hashlib.sha256(json.dumps(list(songs)).encode()).hexdigest()


@dataclass
class NetCDFStoreConfig:
    """Options of the ``netcdf`` store (``shard_mb`` counts float32 activations)."""

    shard_mb: float = 256.0
    shard_tokens: int | None = None
    chunk_tokens: int = 4096
    compression_level: int = 4
    layout: Literal["chunked", "contiguous"] = "chunked"

    def __post_init__(self) -> None:
        if self.shard_mb <= 0 or self.chunk_tokens < 1:
            raise ValueError("shard_mb and chunk_tokens must be positive")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"compression_level must be 0..9, got {self.compression_level}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def tokens_per_shard(self, n_hooks: int, d_model: int) -> int:
        """``shard_tokens``, or as many tokens as fit in ``shard_mb`` of float32 activations."""
        if self.shard_tokens is not None:
            return self.shard_tokens
        return max(1, int(self.shard_mb * 2**20 / (4 * n_hooks * d_model)))


class NetCDFStore(ActivationStore):
    """Activations as netCDF-4 shards with musical coordinates on every token."""

    name = "netcdf"
    description = "netCDF-4 shards: activations(token, hook, d_model) with musical coordinates per token"
    Config = NetCDFStoreConfig

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """A folder holding ``store.json`` (or that file itself)."""
        path = Path(path)
        return (path / MANIFEST).is_file() or (path.name == MANIFEST and path.is_file())

    def create(self, path: Path, *, hooks: Sequence[str], d_model: int, songs: Sequence[str],
               sources: Sequence[str], attrs: Mapping[str, Any], resume: bool = True,
               dtype: str = "float32") -> StoreWriter:
        """Start (or resume) writing a store in ``path``; ``dtype`` is the stored precision."""
        return StoreWriter.open(Path(path), self.config, list(hooks), int(d_model), list(songs),
                                list(sources), dict(attrs), resume, schema.check_dtype(dtype))

    def tokens_per_shard(self, n_hooks: int, d_model: int) -> int:
        return self.config.tokens_per_shard(n_hooks, d_model)

    def attach(self, path: Path, rank: int) -> StoreWriter:
        """Rank ``rank``'s writer in the store rank 0 created (:meth:`StoreWriter.attach`)."""
        return StoreWriter.attach(Path(path), self.config, rank)

    def open(self, path: Path, *, verify: bool = False) -> StoreInfo:
        """The checked store (:func:`~music_interpret.stores.info.check_store`)."""
        return check_store(path, verify_checksums=verify)


@dataclass
class StoreWriter:
    """Appends shards to a store folder; the manifest always lists complete shards only."""

    path: Path
    config: NetCDFStoreConfig
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_name: str = MANIFEST  # a rank's part manifest when written by several ranks

    @classmethod
    def open(cls, path: Path, config: NetCDFStoreConfig, hooks: list[str], d_model: int,
             songs: list[str], sources: list[str], attrs: dict[str, Any], resume: bool,
             dtype: str = "float32") -> StoreWriter:
        path.mkdir(parents=True, exist_ok=True)
        identity = {"hooks": hooks, "d_model": d_model, "n_songs": len(songs),
                    "songs_sha256": songs_digest(songs), "dtype": dtype,
                    "fingerprint": attrs.get("fingerprint")}
        existing = path / MANIFEST
        if resume and existing.exists():
            try:
                manifest = json.loads(existing.read_text())
            except (OSError, ValueError):
                manifest = {}
            same = manifest.get("format_version") == FORMAT_VERSION and \
                all(manifest.get(k) == v for k, v in identity.items())
            if same and not manifest.get("complete") and (path / SONGS_FILE).exists():
                writer = cls(path, config, manifest)
                writer.join_parts()
                return writer
        for stale in [*path.glob("*shard-*.nc*"), *path.glob(f"*{SONGS_FILE}*"), *path.glob(PART_GLOB)]:
            stale.unlink()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "store_id": uuid.uuid4().hex,
            **identity, "songs_file": SONGS_FILE, "variable": schema.variable(dtype),
            "chunk_tokens": config.chunk_tokens, "layout": config.layout,
            "attrs": attrs, "shards": [], "complete": False,
        }
        _write_songs(path / SONGS_FILE, songs, sources, manifest["store_id"])
        write_json_atomic(existing, manifest)
        return cls(path, config, manifest)

    @classmethod
    def attach(cls, path: Path, config: NetCDFStoreConfig, rank: int) -> StoreWriter:
        """The writer of rank ``rank``'s shards in the store rank 0 opened with :meth:`open`.

        Its shards are listed in the rank's part manifest (:func:`part_manifest`) until rank 0
        joins the parts (:meth:`join_parts`) into ``store.json``.
        """
        try:
            root = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / MANIFEST}: cannot read the store manifest ({exc})") from None
        return cls(path, config, {**root, "shards": []}, part_manifest(rank))

    def join_parts(self) -> None:
        """Fold the ranks' part manifests into ``store.json`` and remove them.

        The store keeps the longest run of complete shards from shard 0 whose songs and
        tokens follow on without a gap; shard files outside it are removed (a resumed run
        writes them again).
        """
        parts = sorted(self.path.glob(PART_GLOB))
        found = {k: dict(e) for k, e in enumerate(self.manifest["shards"])}
        for part in parts:
            try:
                entries = json.loads(part.read_text()).get("shards", [])
            except (OSError, ValueError):
                entries = []
            for entry in entries:
                if (self.path / entry["file"]).exists():
                    found[int(entry.pop("index"))] = entry
        kept: list[dict[str, Any]] = []
        while len(kept) in found:
            entry = found[len(kept)]
            before = kept[-1] if kept else {"song_stop": 0, "token_start": 0, "tokens": 0}
            if entry["song_start"] != before["song_stop"] or \
                    entry["token_start"] != before["token_start"] + before["tokens"]:
                break
            kept.append(entry)
        self.manifest["shards"] = kept
        if parts:
            write_json_atomic(self.path / MANIFEST, self.manifest)
            for part in parts:
                part.unlink(missing_ok=True)
        self._drop_strays()

    def _drop_strays(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for f in self.path.glob("*shard-*.nc*"):
            if f.name not in listed:
                f.unlink()

    @property
    def next_song(self) -> int:
        """First song not yet covered by a complete shard (where a resumed run continues)."""
        shards = self.manifest["shards"]
        return shards[-1]["song_stop"] if shards else 0

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def n_tokens(self) -> int:
        return int(sum(int(s["tokens"]) for s in self.manifest["shards"]))

    @property
    def dtype(self) -> str:
        return str(self.manifest.get("dtype", "float32"))

    def write_shard(self, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    song_start: int, song_stop: int, *, index: int | None = None,
                    token_start: int | None = None) -> Path:
        """Write one shard: ``acts`` (n_tokens, n_hooks, d_model) float32 and token coordinates.

        The file is written under a temporary name, synced, checksummed and renamed; only
        then does the manifest list it. On any failure the temporary file is removed (a
        full disk is reported as :class:`DiskFull` naming the shard). ``index`` and
        ``token_start`` (a rank's writer, see :meth:`attach`): the shard's place in the
        store, by default the next one.
        """
        m = self.manifest
        n = acts.shape[0]
        if acts.shape[1:] != (len(m["hooks"]), m["d_model"]):
            raise ValueError(f"shard activations {acts.shape} do not match hooks/d_model")
        index = self.n_shards if index is None else index
        final = self.path / shard_name(index)
        if self.dtype == "float16" and n and (peak := float(np.abs(acts).max())) > schema.FLOAT16_MAX:
            raise UserError(f"{final}: activations reach |x| = {peak:.4g}, beyond float16's range "
                            f"({schema.FLOAT16_MAX:g}); extract with dtype bfloat16 or float32")
        tmp = self.path / f".{final.name}.tmp"
        first = sum(int(s["tokens"]) for s in m["shards"]) if token_start is None else token_start
        try:
            self._write_file(tmp, acts, coords, index, first, song_start, song_stop)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            checksum = file_checksum(tmp)
            os.replace(tmp, final)
        except BaseException as exc:
            full = is_disk_full(exc, self.path, need=acts.nbytes + (1 << 20))
            tmp.unlink(missing_ok=True)
            if full:
                raise DiskFull(f"no space left on device while writing {final}") from None
            raise
        entry = {"file": final.name, "tokens": int(n), "token_start": int(first),
                 "song_start": int(song_start), "song_stop": int(song_stop), "checksum": checksum}
        if self.manifest_name != MANIFEST:
            entry["index"] = int(index)
        m["shards"].append(entry)
        write_json_atomic(self.path / self.manifest_name, m)
        return final

    def _write_file(self, tmp: Path, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    index: int, first: int, song_start: int, song_stop: int) -> None:
        """The shard's netCDF-4 file, written to ``tmp`` through h5netcdf."""
        import h5py

        m, cfg = self.manifest, self.config
        n, d = acts.shape[0], m["d_model"]
        chunk = max(1, min(cfg.chunk_tokens, n))
        coord_chunk = (max(1, min(n, COORD_CHUNK_FACTOR * chunk)),)
        zlib = {"compression": "gzip", "compression_opts": max(1, cfg.compression_level),
                "shuffle": True} if cfg.compression_level > 0 and n else {}
        names = m["attrs"].get("instrument_names") or None
        events = self._vocabulary().events
        # a shard smaller than one chunk is one block anyway; contiguous, its rows stay
        # on a whole-row grid whatever d_model (aligned chunks of another size would not)
        whole = m.get("layout", "chunked") == "contiguous" or n < cfg.chunk_tokens
        align = dict(ALIGN)
        if not whole:  # chunks under the threshold are aligned too, so that they lie on rows
            align["alignment_threshold"] = min(align["alignment_threshold"],
                                               chunk * d * schema.itemsize(self.dtype))
        with H5_LOCK, _netcdf_file(tmp, align) as nc:
            nc.dimensions = {"token": n, "hook": len(m["hooks"]), "d_model": d}
            nc.attrs.update(self._global_attrs(index, first, song_start, song_stop))
            token = nc.create_variable("token", ("token",), np.int64, chunks=coord_chunk if n else None,
                                       data=np.arange(first, first + n, dtype=np.int64), **zlib)
            token.attrs.update(schema.token_attrs())
            hook = nc.create_variable("hook", ("hook",), h5py.string_dtype())
            hook[:] = np.asarray(m["hooks"], dtype=object)
            hook.attrs["long_name"] = "hook point"
            stored = schema.encode(acts, self.dtype)
            var = nc.create_variable(schema.variable(self.dtype), ("token", "hook", "d_model"),
                                     stored.dtype, chunks=None if whole else (chunk, 1, d),
                                     fill_time="never")
            var.attrs.update(schema.activation_attrs(self.dtype))
            var.attrs["coordinates"] = " ".join(TOKEN_COORDS)
            if n:
                var[...] = stored
            for name, (kind, _) in TOKEN_COORDS.items():
                v = nc.create_variable(name, ("token",), np.dtype(kind),
                                       chunks=coord_chunk if n else None,
                                       data=np.asarray(coords[name]).astype(kind), **zlib)
                v.attrs.update(schema.coord_attrs(name, names, events))

    def _vocabulary(self) -> EventVocabulary:
        """The event vocabulary the attrs record (see :mod:`music_interpret.vocabulary`)."""
        from ..vocabulary import store_vocabulary

        return store_vocabulary(self.manifest["attrs"])

    def _global_attrs(self, index: int, first: int, song_start: int, song_stop: int) -> dict[str, Any]:
        m = self.manifest
        attrs: dict[str, Any] = {
            "Conventions": "CF-1.10",
            "title": "music-interpret token activations",
            "store_format": f"{FORMAT}/{FORMAT_VERSION}",
            "store_id": m["store_id"],
            "shard_index": index,
            "token_start": first,
            "song_start": song_start,
            "song_stop": song_stop,
            "hook_points": " ".join(m["hooks"]),
            "d_model": m["d_model"],
            "stored_dtype": self.dtype,
            "song_table": f"{SONGS_FILE} (song_name, song_source over songs; coordinate 'song' "
                          "indexes it)",
            "instrument_names": json.dumps(m["attrs"].get("instrument_names", [])),
        }
        for key, value in m["attrs"].items():
            if key in attrs or key == "instrument_names":
                continue
            attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        return attrs

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete."""
        self.manifest["complete"] = True
        self.manifest["n_tokens"] = int(sum(s["tokens"] for s in self.manifest["shards"]))
        if summary:
            self.manifest["summary"] = dict(summary)
        write_json_atomic(self.path / MANIFEST, self.manifest)


@contextmanager
def _netcdf_file(path: Path, options: Mapping[str, Any]) -> Iterator[Any]:
    """An h5netcdf file open for writing at ``path``, closed (and flushed) on success.

    On a failure (a full disk, say) the HDF5 file is closed without the final flush:
    h5netcdf's own close would flush again into the failed file, which crashes HDF5.
    """
    import h5netcdf
    import h5py

    h5 = h5py.File(path, "w", track_order=True, **options)
    nc = h5netcdf.File(h5, "w")
    try:
        yield nc
        nc.flush()
        h5.flush()  # write errors (a full disk) surface here, not in a silent close
        nc.close()
        h5.close()
    except BaseException:
        nc._closed = True  # no flush into the failed file (h5netcdf has no public way)
        with suppress(Exception):
            h5.close()
        raise


def _write_songs(path: Path, songs: Sequence[str], sources: Sequence[str], store_id: str) -> None:
    """``songs.nc``: the song table, written once (temporary name, then renamed)."""
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with H5_LOCK, _netcdf_file(tmp, {}) as nc:
            nc.dimensions = {"songs": len(songs)}
            nc.attrs.update({"Conventions": "CF-1.10", "title": "music-interpret song table",
                             "store_format": f"{FORMAT}/{FORMAT_VERSION}", "store_id": store_id})
            for name, values, doc in (("song_name", songs, "song name"),
                                      ("song_source", sources, "file the song was read from")):
                var = nc.create_variable(name, ("songs",), h5py.string_dtype())
                if len(values):
                    var[:] = np.asarray(list(values), dtype=object)
                var.attrs["long_name"] = doc
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = is_disk_full(exc, path.parent, need=1 << 20)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFull(f"no space left on device while writing {path}") from None
        raise
