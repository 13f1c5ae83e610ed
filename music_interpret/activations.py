"""Open a whole activation store as one xarray Dataset (for notebooks and analyses).

>>> import music_interpret as mi
>>> ds = mi.open_activations("data/activations/demo")
>>> ds.activations.sel(hook="resid_post.1").where(ds.event_type == 3, drop=True)

The shards are plain CF netCDF-4: ``xarray.open_mfdataset("<store>/shard-*.nc")``
with default arguments gives the same Dataset as this function, without the song
table (``song_name`` / ``song_source`` over ``songs``, stored once in ``songs.nc``),
which this function adds, and for 16-bit stores with the raw ``activation_bits``,
which this function decodes to float32 ``activations``.

The store is opened by the store plugin that wrote it (:func:`music_interpret.stores.open_store`,
``StoreReader.open_dataset``). With dask installed (``pip install music-interpret[dask]``)
the store opens lazily, one dask chunk per a few activation chunks of a shard;
``parallel=True`` opens the shards in parallel. To scale an analysis out, start a
``dask.distributed.Client`` before the call: every reduction on the returned Dataset
then runs on the cluster (each worker must see the store folder). Without dask the
shards are read eagerly into memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
    from .stores import open_store

    reader = open_store(path, verify=verify)
    return reader.open_dataset(hooks, lazy=lazy, parallel=parallel, chunk_tokens=chunk_tokens,
                               load_coords=load_coords)

