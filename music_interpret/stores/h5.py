"""HDF5 access of the ``netcdf`` store's files: one lock, read-only opens, shard reads.

All reads go through h5py (the HDF5 library h5netcdf writes with), under
:data:`H5_LOCK`, the lock xarray takes around its own HDF5 calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import schema


def _hdf5_lock() -> Any:
    """xarray's HDF5 lock (its h5netcdf and netCDF4 reads take it too)."""
    try:
        from xarray.backends.locks import HDF5_LOCK

        return HDF5_LOCK
    except (ImportError, AttributeError):  # pragma: no cover - xarray is a dependency
        import threading

        return threading.Lock()


#: every HDF5 call of the package holds this lock (shared with xarray's reads)
H5_LOCK = _hdf5_lock()
NC_LOCK = H5_LOCK  # the name it had when shards went through netCDF-C


def open_h5(path: Path, **kwargs: Any) -> Any:
    """A shard (or song table) opened read-only with h5py.

    HDF5's default file locking first (an open the same process made, e.g. through
    xarray, must agree on it), without locking when that fails (file systems that
    cannot lock, or an earlier open without locking).
    """
    import h5py

    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise
        return h5py.File(path, "r", locking=False, **kwargs)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _text(value.item()) if value.size == 1 else str(value)
    return str(value)


def shard_variable(f: Any) -> tuple[Any, str]:
    """(the stored activation dataset of an open shard, its dtype)."""
    if "activations" in f:
        return f["activations"], "float32"
    var = f[schema.BITS]
    return var, _text(var.attrs.get("music_interpret_dtype")) or "bfloat16"


def read_block(shard: Path, hook_index: int, start: int, stop: int) -> np.ndarray:
    """Activations of one hook for tokens [start, stop) of a shard, as float32 (n, d_model)."""
    with H5_LOCK, open_h5(shard) as f:
        var, dtype = shard_variable(f)
        return schema.decode(var[start:stop, hook_index, :], dtype)


def read_coords(shard: Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Token coordinates of the shard file ``shard`` (all of them unless ``names`` is given)."""
    with H5_LOCK, open_h5(shard) as f:
        return {name: np.asarray(f[name][:]) for name in (names or schema.TOKEN_COORDS)}
