"""The ``netcdf`` activation store: one netCDF-4 file per shard plus ``store.json``.

Layout of a store folder::

    store.json          manifest: hooks, d_model, song table, shards (rewritten atomically)
    shard-00000.nc      activations(token, hook, d_model) float32 + coordinates on token
    shard-00001.nc      ...
    stats/              written by the preprocess stage

Each shard is written to ``.shard-NNNNN.nc.tmp`` and renamed when complete, then
the manifest is updated; a shard file that is not in the manifest is not part of
the store. Activations are stored uncompressed, aligned to 4 KiB: with the default
``layout: chunked`` in chunks of ``chunk_tokens`` tokens of one hook point (fast
sequential and block reads of one hook), with ``layout: contiguous`` (and for a
shard of fewer tokens than one chunk, whatever the layout) as one token-major block.
Either way a shard's activations are one byte range that the
training loader memory-maps and gathers rows from (see
:mod:`music_interpret.stores.mapped`). The small integer coordinates are
zlib-compressed in chunks of ``COORD_CHUNK_FACTOR * chunk_tokens`` tokens.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..checksums import checksum_matches, file_checksum
from ..errors import DiskFull, UserError
from ..interfaces import ActivationStore
from ..jsonio import is_disk_full, write_json_atomic

FORMAT = "music-interpret-activations"
FORMAT_VERSION = 1
MANIFEST = "store.json"
COORD_CHUNK_FACTOR = 4  # coordinates (and dask chunks) span this many activation chunks
LAYOUTS = ("chunked", "contiguous")
ALIGN = (1 << 16, 4096)  # HDF5 objects of 64 KiB or more start on a 4 KiB boundary
EVENT_TYPES = ("start-of-song", "instrument", "start-of-notes", "note", "end-of-song")

#: coordinates on every token: name -> (netCDF type, description)
TOKEN_COORDS: dict[str, tuple[str, str]] = {
    "song": ("i4", "index into the song table (song_name, song_source)"),
    "seq_pos": ("i4", "position of the token in the model input window"),
    "song_token": ("i4", "position of the token in the whole song's token sequence"),
    "window": ("i4", "index of the model window (of this song) the activation comes from"),
    "event_type": ("i1", "MMT event type"),
    "beat": ("i4", "beat of the note onset in the song (-1: not a note)"),
    "position": ("i2", "onset inside the beat in 1/12 beat (-1: not a note)"),
    "pitch": ("i2", "MIDI pitch (-1: not a note)"),
    "duration": ("i4", "duration in 1/12 beats (-1: not a note)"),
    "instrument": ("i2", "MMT instrument code (-1: none)"),
    "program": ("i2", "General MIDI program (-1: none)"),
}


def _netcdf_lock() -> Any:
    """The lock xarray takes around netCDF4/HDF5 calls (netCDF-C is not thread-safe)."""
    try:
        from xarray.backends.netCDF4_ import NETCDF4_PYTHON_LOCK

        return NETCDF4_PYTHON_LOCK
    except (ImportError, AttributeError):  # pragma: no cover - xarray is a dependency
        import threading

        return threading.Lock()


#: every netCDF4 call of the package holds this lock (shared with xarray's reads)
NC_LOCK = _netcdf_lock()


@contextmanager
def _aligned(netCDF4: Any) -> Iterator[None]:
    """Files created inside align their large objects (the activation chunks) to 4 KiB."""
    previous = tuple(netCDF4.get_alignment())
    netCDF4.set_alignment(*ALIGN)
    try:
        yield
    finally:  # (0, 0) means "never set"; setting it would make HDF5 refuse every file
        netCDF4.set_alignment(*(previous if previous != (0, 0) else (1, 1)))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.nc"


@dataclass
class NetCDFStoreConfig:
    """Options of the ``netcdf`` store."""

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

    def create(self, path: Path, *, hooks: Sequence[str], d_model: int, songs: Sequence[str],
               sources: Sequence[str], attrs: Mapping[str, Any], resume: bool = True) -> StoreWriter:
        """Start (or resume) writing a store in ``path``."""
        return StoreWriter.open(Path(path), self.config, list(hooks), int(d_model), list(songs),
                                list(sources), dict(attrs), resume)

    def tokens_per_shard(self, n_hooks: int, d_model: int) -> int:
        return self.config.tokens_per_shard(n_hooks, d_model)

    def open(self, path: Path, hooks: Sequence[str] | None = None) -> Any:
        from ..activations import open_activations

        return open_activations(path, list(hooks) if hooks is not None else None)


@dataclass
class StoreWriter:
    """Appends shards to a store folder; the manifest always lists complete shards only."""

    path: Path
    config: NetCDFStoreConfig
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, config: NetCDFStoreConfig, hooks: list[str], d_model: int,
             songs: list[str], sources: list[str], attrs: dict[str, Any], resume: bool) -> StoreWriter:
        path.mkdir(parents=True, exist_ok=True)
        identity = {"hooks": hooks, "d_model": d_model, "songs": songs,
                    "fingerprint": attrs.get("fingerprint")}
        existing = path / MANIFEST
        if resume and existing.exists():
            manifest = json.loads(existing.read_text())
            same = all(manifest.get(k) == v for k, v in identity.items())
            if same and not manifest.get("complete"):
                writer = cls(path, config, manifest)
                writer._drop_strays()
                return writer
        for stale in path.glob("*shard-*.nc*"):
            stale.unlink()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "store_id": uuid.uuid4().hex,
            **identity, "song_sources": sources, "chunk_tokens": config.chunk_tokens,
            "layout": config.layout,
            "attrs": attrs, "shards": [], "complete": False,
        }
        write_json_atomic(existing, manifest)
        return cls(path, config, manifest)

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

    def write_shard(self, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    song_start: int, song_stop: int) -> Path:
        """Write one shard: ``acts`` (n_tokens, n_hooks, d_model) float32 and token coordinates.

        The file is written under a temporary name, synced, checksummed and renamed; only
        then does the manifest list it. On any failure the temporary file is removed (a
        full disk is reported as :class:`DiskFull` naming the shard).
        """
        m = self.manifest
        n = acts.shape[0]
        if acts.shape[1:] != (len(m["hooks"]), m["d_model"]):
            raise ValueError(f"shard activations {acts.shape} do not match hooks/d_model")
        index = self.n_shards
        final = self.path / shard_name(index)
        tmp = self.path / f".{final.name}.tmp"
        try:
            self._write_file(tmp, acts, coords, index, song_start, song_stop)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            checksum = file_checksum(tmp)
            os.replace(tmp, final)
        except BaseException as exc:
            # netCDF-C reports a full disk as a bare "HDF error": told by the free space
            full = is_disk_full(exc, self.path, need=acts.nbytes + (1 << 20))
            tmp.unlink(missing_ok=True)
            if full:
                raise DiskFull(f"no space left on device while writing {final}") from None
            raise
        m["shards"].append({"file": final.name, "tokens": int(n), "song_start": int(song_start),
                            "song_stop": int(song_stop), "checksum": checksum})
        write_json_atomic(self.path / MANIFEST, m)
        return final

    def _write_file(self, tmp: Path, acts: np.ndarray, coords: Mapping[str, np.ndarray],
                    index: int, song_start: int, song_stop: int) -> None:
        """The shard's netCDF file, written to ``tmp``."""
        import netCDF4

        m = self.manifest
        n = acts.shape[0]
        chunk = max(1, min(self.config.chunk_tokens, n))
        with NC_LOCK, _aligned(netCDF4), netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            nc.createDimension("token", n)
            nc.createDimension("hook", len(m["hooks"]))
            nc.createDimension("d_model", m["d_model"])
            nc.createDimension("songs", len(m["songs"]))
            for key, value in self._global_attrs(index, song_start, song_stop).items():
                nc.setncattr(key, value)
            hook = nc.createVariable("hook", str, ("hook",))
            hook[:] = np.asarray(m["hooks"], dtype=object)
            hook.long_name = "hook point"
            # a shard smaller than one chunk is one block anyway; contiguous, its rows stay
            # on a whole-row grid whatever d_model (aligned chunks of another size would not)
            whole = m.get("layout", "chunked") == "contiguous" or n < self.config.chunk_tokens
            layout = {"contiguous": True} if whole else {"chunksizes": (chunk, 1, m["d_model"])}
            var = nc.createVariable("activations", "f4", ("token", "hook", "d_model"), **layout)
            var.long_name = "residual stream activation"
            var[:] = np.ascontiguousarray(acts, dtype=np.float32)
            for name, (dtype, doc) in TOKEN_COORDS.items():
                v = nc.createVariable(name, dtype, ("token",), zlib=self.config.compression_level > 0,
                                      complevel=max(1, self.config.compression_level),
                                      chunksizes=(min(n, COORD_CHUNK_FACTOR * chunk),))
                v.long_name = doc
                if name == "event_type":
                    v.flag_values = np.arange(len(EVENT_TYPES), dtype=np.int8)
                    v.flag_meanings = " ".join(e.replace("-", "_") for e in EVENT_TYPES)
                elif name not in ("song", "seq_pos", "song_token", "window"):
                    v.comment = "-1 where not applicable (kept as an integer, not a fill value)"
                v[:] = np.asarray(coords[name]).astype(dtype)
            names = nc.createVariable("song_name", str, ("songs",))
            names[:] = np.asarray(m["songs"], dtype=object)
            srcs = nc.createVariable("song_source", str, ("songs",))
            srcs[:] = np.asarray(m["song_sources"], dtype=object)

    def _global_attrs(self, index: int, song_start: int, song_stop: int) -> dict[str, Any]:
        m = self.manifest
        attrs = {
            "Conventions": "CF-1.10",
            "title": "music-interpret token activations",
            "store_format": f"{FORMAT}/{FORMAT_VERSION}",
            "store_id": m["store_id"],
            "shard_index": index,
            "song_start": song_start,
            "song_stop": song_stop,
            "hook_points": " ".join(m["hooks"]),
            "d_model": m["d_model"],
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


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreInfo:
    """A checked store: manifest plus the shard files, in order."""

    path: Path
    manifest: dict[str, Any]
    shards: tuple[Path, ...]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(sum(s["tokens"] for s in self.manifest["shards"]))

    @property
    def songs(self) -> list[str]:
        return list(self.manifest["songs"])

    def hook_index(self, hook: str) -> int:
        """Position of ``hook`` in the hook dimension; UserError naming the hooks that exist."""
        if hook not in self.manifest["hooks"]:
            raise UserError(f"{self.path}: hook point {hook!r} was not extracted "
                            f"(extracted: {', '.join(self.manifest['hooks'])})")
        return self.manifest["hooks"].index(hook)


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
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path}: not a {FORMAT} manifest")
    if require_complete and not manifest.get("complete"):
        raise UserError(f"{path}: the store is incomplete (extraction did not finish; rerun it to resume)")
    if not manifest["shards"]:
        raise UserError(f"{path}: the store has no shards")
    shards = tuple(path / s["file"] for s in manifest["shards"])
    if verify_shards or verify_checksums:
        for entry, shard in zip(manifest["shards"], shards, strict=True):
            _check_shard(shard, entry, manifest)
            recorded = entry.get("checksum")
            if verify_checksums and recorded and not checksum_matches(shard, recorded):
                raise UserError(f"{shard}: the file changed after it was written (checksum "
                                f"mismatch with {MANIFEST}); extract the store again")
    return StoreInfo(path, manifest, shards)


def _check_shard(shard: Path, entry: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    import netCDF4

    if not shard.exists():
        raise UserError(f"{shard}: shard listed in {MANIFEST} is missing")
    try:
        with NC_LOCK, netCDF4.Dataset(shard) as nc:
            store_id = nc.getncattr("store_id") if "store_id" in nc.ncattrs() else None
            hooks = nc.getncattr("hook_points").split() if "hook_points" in nc.ncattrs() else None
            n = len(nc.dimensions["token"])
            d = len(nc.dimensions["d_model"])
    except (OSError, KeyError, RuntimeError) as exc:
        raise UserError(f"{shard}: corrupt or truncated shard ({str(exc).splitlines()[0]})") from None
    if store_id != manifest["store_id"]:
        raise UserError(f"{shard}: shard belongs to another store (store_id {store_id})")
    if hooks != list(manifest["hooks"]):
        raise UserError(f"{shard}: hook points {hooks} disagree with the store's {manifest['hooks']}")
    if d != manifest["d_model"]:
        raise UserError(f"{shard}: d_model {d} disagrees with the store's {manifest['d_model']}")
    if n != entry["tokens"]:
        raise UserError(f"{shard}: holds {n} tokens, the manifest says {entry['tokens']}")


def read_block(shard: Path, hook_index: int, start: int, stop: int) -> np.ndarray:
    """Activations of one hook for tokens [start, stop) of a shard, as float32 (n, d_model)."""
    import netCDF4

    with NC_LOCK, netCDF4.Dataset(shard) as nc:
        var = nc.variables["activations"]
        var.set_auto_mask(False)
        return np.asarray(var[start:stop, hook_index, :], dtype=np.float32)


def read_coords(shard: Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Token coordinates of a shard (all of them unless ``names`` is given)."""
    import netCDF4

    with NC_LOCK, netCDF4.Dataset(shard) as nc:
        out = {}
        for name in names or TOKEN_COORDS:
            var = nc.variables[name]
            var.set_auto_mask(False)
            out[name] = np.asarray(var[:])
        return out
