"""A ``netcdf`` store as one xarray Dataset (``StoreInfo.open_dataset``).

The shards are plain CF netCDF-4: ``xarray.open_mfdataset("<store>/shard-*.nc")`` with
default arguments gives the same Dataset, without the song table (``song_name`` /
``song_source`` over ``songs``, stored once in ``songs.nc``), which is added here, and
for 16-bit stores with the raw ``activation_bits``, which are decoded here to float32
``activations``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema

if TYPE_CHECKING:
    from .info import StoreInfo

_SHARD_ATTRS = ("shard_index", "token_start", "song_start", "song_stop")
_COMBINE = {"data_vars": "minimal", "coords": "minimal", "compat": "override",
            "join": "override", "combine_attrs": "override"}


def has_dask() -> bool:
    """Whether dask is importable."""
    return importlib.util.find_spec("dask") is not None


def open_dataset(info: StoreInfo, hooks: Sequence[str] | None = None, *, lazy: bool | None = None,
                 parallel: bool = False, chunk_tokens: int | None = None,
                 load_coords: bool = True) -> Any:
    """One ``xarray.Dataset`` over every shard of the checked store ``info`` (see
    :func:`music_interpret.open_activations`)."""
    if hooks is not None:
        for hook in hooks:
            info.hook_index(hook)
    if lazy is None:
        lazy = has_dask()
    chunk = chunk_tokens or schema.COORD_CHUNK_FACTOR * int(info.manifest.get("chunk_tokens", 4096))
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
