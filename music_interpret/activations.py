"""Open a whole activation store as one xarray Dataset (for notebooks and analyses).

>>> import music_interpret as mi
>>> ds = mi.open_activations("data/activations/demo")
>>> ds.activations.sel(hook="resid_post.1").where(ds.event_type == 3, drop=True)

The shards are plain CF netCDF-4: ``xarray.open_mfdataset("<store>/shard-*.nc")``
with default arguments gives the same Dataset as this function, without the song
table (``song_name`` / ``song_source`` over ``songs``, stored once in ``songs.nc``),
which this function adds, and for 16-bit stores with the raw ``activation_bits``,
which this function decodes to float32 ``activations``.

With dask installed (``pip install music-interpret[dask]``) the store opens lazily,
one dask chunk per ``COORD_CHUNK_FACTOR * chunk_tokens`` tokens of a shard;
``parallel=True`` opens the shards in parallel. To scale an analysis out, start a
``dask.distributed.Client`` before the call: every reduction on the returned Dataset
then runs on the cluster (each worker must see the store folder). Without dask the
shards are read eagerly into memory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from .stores import schema
from .stores.info import COORD_CHUNK_FACTOR, StoreInfo, check_store

_SHARD_ATTRS = ("shard_index", "token_start", "song_start", "song_stop")
_COMBINE = {"data_vars": "minimal", "coords": "minimal", "compat": "override",
            "join": "override", "combine_attrs": "override"}


def has_dask() -> bool:
    """Whether dask is importable."""
    return importlib.util.find_spec("dask") is not None


def open_activations(
    path: str | Path,
    hooks: list[str] | None = None,
    *,
    lazy: bool | None = None,
    parallel: bool = False,
    chunk_tokens: int | None = None,
    load_coords: bool = True,
    verify: bool = False,
) -> Any:
    """One ``xarray.Dataset`` over every shard of the store at ``path``.

    ``activations(token, hook, d_model)`` is float32 whatever the stored precision.
    ``hooks`` selects hook points (all by default). ``lazy`` defaults to True when dask
    is installed. ``token`` is the int64 index over the whole store; the token
    coordinates (song, seq_pos, event_type, beat, position, pitch, duration, instrument,
    program, ...) are coordinates of ``token``; the song table is ``song_name`` /
    ``song_source`` over ``songs``. With ``load_coords`` (default) the coordinates are
    read into memory even when the activations stay lazy (about 30 bytes a token), so
    that selections such as ``ds.where(ds.event_type == 3, drop=True)`` work directly.
    ``verify`` first reads every shard and compares it with the checksum recorded when
    it was written.
    """
    info = check_store(path, verify_checksums=verify)
    if hooks is not None:
        for hook in hooks:
            info.hook_index(hook)
    if lazy is None:
        lazy = has_dask()
    chunk = chunk_tokens or COORD_CHUNK_FACTOR * int(info.manifest.get("chunk_tokens", 4096))
    ds = _open_shards(info, lazy, parallel, chunk)
    if info.format_version < 2:
        ds = _upgrade_v1(ds)
    names = [n for n in schema.TOKEN_COORDS if n in ds]
    ds = ds.set_coords(names)
    if lazy and load_coords:
        ds = ds.assign_coords({n: ds[n].compute() for n in names})
    ds = ds.assign_coords(song_name=("songs", np.asarray(info.songs, dtype=object),
                                     {"long_name": "song name"}),
                          song_source=("songs", np.asarray(info.song_sources, dtype=object),
                                       {"long_name": "file the song was read from"}))
    if schema.BITS in ds:
        ds = _decode_bits(ds)
    for key in _SHARD_ATTRS:
        ds.attrs.pop(key, None)
    ds.attrs["store_path"] = str(info.path)
    ds.attrs["n_shards"] = len(info.shards)
    if hooks is not None:
        ds = ds.sel(hook=list(hooks))
    return ds


def _open_shards(info: StoreInfo, lazy: bool, parallel: bool, chunk: int) -> Any:
    import xarray as xr

    files = [str(p) for p in info.shards]
    if lazy:
        return xr.open_mfdataset(files, engine="h5netcdf", combine="nested", concat_dim="token",
                                 parallel=parallel, chunks={"token": chunk}, **_COMBINE)
    parts = []
    for shard in files:
        with xr.open_dataset(shard, engine="h5netcdf") as part:
            parts.append(part.load())
    return xr.concat(parts, dim="token", **_COMBINE)


def _upgrade_v1(ds: Any) -> Any:
    """A format-1 store as format 2 presents it: a global int64 ``token`` index and the
    song table not repeated per shard (the caller adds it once)."""
    ds = ds.drop_vars([n for n in ("song_name", "song_source") if n in ds])
    token = np.arange(ds.sizes["token"], dtype=np.int64)
    return ds.assign_coords(token=("token", token, schema.token_attrs()))


def _decode_bits(ds: Any) -> Any:
    """Replace ``activation_bits`` (uint16 patterns) by float32 ``activations``."""
    import xarray as xr

    bits = ds[schema.BITS]
    dtype = str(bits.attrs.get("music_interpret_dtype", "bfloat16"))
    data = bits.data
    if hasattr(data, "map_blocks"):  # dask: decoded chunk by chunk, lazily
        decoded = data.map_blocks(schema.decode, dtype, dtype=np.float32)
    else:
        decoded = schema.decode(np.asarray(data), dtype)
    attrs = {**schema.activation_attrs("float32"), "music_interpret_stored_dtype": dtype}
    out = ds.drop_vars(schema.BITS)
    out["activations"] = xr.Variable(bits.dims, decoded, attrs)
    return out
