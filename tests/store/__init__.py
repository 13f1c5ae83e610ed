"""Tests of the activation store's consumers (statistics, normalisation, loader).

:func:`make_store` writes a small synthetic netCDF store whose activations the test
controls: by default dimension 0 of every token holds its global token index (a
unique marker), the other dimensions are random with per-dimension offsets/scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

HOOKS = ("resid_post.0", "resid_post.1")


def synthetic(n_tokens: int, d_model: int, n_hooks: int = 2, seed: int = 0) -> np.ndarray:
    """(n, hooks, d) float32: dim 0 = token index, others ~ N(offset_j, scale_j)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 3, (n_hooks, d_model))
    scales = rng.uniform(0.2, 2.0, (n_hooks, d_model))
    acts = rng.normal(size=(n_tokens, n_hooks, d_model)) * scales + offsets
    acts[:, :, 0] = np.arange(n_tokens)[:, None]
    return acts.astype(np.float32)


def coords_for(n_tokens: int, song_start: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible token coordinates (event types 0..4, instruments 0..7)."""
    rng = np.random.default_rng(seed)
    out = {name: np.full(n_tokens, -1) for name in TOKEN_COORDS}
    out["song"] = song_start + np.arange(n_tokens) * 2 // max(n_tokens, 1)
    out["seq_pos"] = np.arange(n_tokens) % 1024
    out["song_token"] = np.arange(n_tokens)
    out["window"] = np.arange(n_tokens) // 1024
    out["event_type"] = rng.choice(5, n_tokens, p=[0.05, 0.1, 0.05, 0.75, 0.05])
    out["instrument"] = rng.integers(0, 8, n_tokens)
    out["pitch"] = rng.integers(30, 90, n_tokens)
    return out


def make_store(path: Path, acts: np.ndarray, shard_sizes: Sequence[int], *,
               chunk_tokens: int = 256, hooks: Sequence[str] = HOOKS,
               coord_seed: int = 0, layout: str = "contiguous") -> tuple[Path, dict[str, np.ndarray]]:
    """Write ``acts`` (n, hooks, d) as a store with the given shard sizes; returns (path, coords)."""
    assert sum(shard_sizes) == len(acts)
    songs = [f"song{i}" for i in range(2 * len(shard_sizes))]
    writer = NetCDFStore(NetCDFStoreConfig(chunk_tokens=chunk_tokens, layout=layout)).create(
        path, hooks=list(hooks), d_model=acts.shape[2], songs=songs, sources=songs,
        attrs={"fingerprint": "test"}, resume=False)
    start, parts = 0, []
    for k, n in enumerate(shard_sizes):
        coords = coords_for(n, 2 * k, seed=coord_seed + k)
        writer.write_shard(acts[start : start + n], coords, 2 * k, 2 * k + 2)
        parts.append(coords)
        start += n
    writer.finish()
    return path, {name: np.concatenate([p[name] for p in parts]) for name in TOKEN_COORDS}
