"""Open a whole activation store as one xarray Dataset (for notebooks and analyses).

>>> import music_interpret as mi
>>> ds = mi.open_activations("data/activations/demo")
>>> ds.activations.sel(hook="resid_post.1").where(ds.event_type == 3, drop=True)

With dask installed (``pip install music-interpret[dask]``) the store opens lazily,
one dask chunk per ``chunk_tokens`` tokens of a shard, through
``xarray.open_mfdataset``; ``parallel=True`` opens the shards in parallel. To scale
an analysis out, start a ``dask.distributed.Client`` before the call: every
reduction on the returned Dataset then runs on the cluster (each worker must see
the store folder). Without dask the shards are read eagerly into memory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .stores.netcdf import COORD_CHUNK_FACTOR, TOKEN_COORDS, check_store

_SHARD_ATTRS = ("shard_index", "song_start", "song_stop")


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

    ``hooks`` selects hook points (all by default). ``lazy`` defaults to True when
    dask is installed. Token coordinates (song, seq_pos, event_type, beat, position,
    pitch, duration, instrument, program, ...) are coordinates of ``token``; the
    song table is ``song_name`` / ``song_source`` over ``songs``. With ``load_coords``
    (default) the coordinates are read into memory even when the activations stay
    lazy (about 30 bytes a token), so that selections such as
    ``ds.where(ds.event_type == 3, drop=True)`` work directly. ``verify`` first reads every
    shard and compares it with the checksum recorded when it was written.
    """
    import xarray as xr

    info = check_store(path, verify_checksums=verify)
    if hooks is not None:
        for hook in hooks:
            info.hook_index(hook)
    if lazy is None:
        lazy = has_dask()
    chunk = chunk_tokens or COORD_CHUNK_FACTOR * int(info.manifest.get("chunk_tokens", 4096))
    common = {"engine": "netcdf4", "mask_and_scale": False}
    if lazy:
        ds = xr.open_mfdataset(
            [str(p) for p in info.shards], combine="nested", concat_dim="token",
            data_vars="minimal", coords="minimal", compat="override", join="override",
            combine_attrs="override", parallel=parallel, chunks={"token": chunk}, **common,
        )
    else:
        parts = []
        for shard in info.shards:
            with xr.open_dataset(shard, **common) as part:
                parts.append(part.load())
        ds = xr.concat(parts, dim="token", data_vars="minimal", coords="minimal",
                       compat="override", join="override", combine_attrs="override")
    names = [n for n in (*TOKEN_COORDS, "song_name", "song_source") if n in ds]
    ds = ds.set_coords(names)
    if lazy and load_coords:
        ds = ds.assign_coords({n: ds[n].compute() for n in names})
    for key in _SHARD_ATTRS:
        ds.attrs.pop(key, None)
    ds.attrs["store_path"] = str(info.path)
    ds.attrs["n_shards"] = len(info.shards)
    if hooks is not None:
        ds = ds.sel(hook=list(hooks))
    return ds
