"""Planted-feature fixtures for the analyzers.

:func:`planted_store` writes a small store of songs whose note tokens carry a pitch
class that dimension ``pc`` of the activation marks (value ``SIGNAL`` + noise; other
dimensions small noise), and :func:`planted_dictionary` a ReLU dictionary whose latent
``i < 12`` fires exactly on pitch class ``i`` and whose last latents are dead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from music_interpret.learners.dictionary import Dictionary
from music_interpret.learners.io import save_dictionary
from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

HOOK = "resid_post.1"
D_MODEL = 16
D_SAE = 14  # 12 pitch-class latents + 2 dead ones
SIGNAL = 2.0


def song_coords(song: int, n_notes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Coordinates of one song: sos, 2 instruments, start-of-notes, notes, eos."""
    n = n_notes + 5
    c = {name: np.full(n, -1, np.int64) for name in TOKEN_COORDS}
    c["song"][:] = song
    c["song_token"] = np.arange(n)
    c["seq_pos"] = np.arange(n)
    c["window"][:] = 0
    c["event_type"] = np.array([0, 1, 1, 2, *([3] * n_notes), 4])
    c["instrument"][1:3] = [25, 26]
    notes = slice(4, 4 + n_notes)
    c["instrument"][notes] = rng.choice([25, 26], n_notes)
    c["pitch"][notes] = rng.integers(48, 80, n_notes)
    c["beat"][notes] = np.sort(rng.integers(0, 64, n_notes))
    c["position"][notes] = rng.choice([0, 3, 6, 9], n_notes)
    c["duration"][notes] = rng.choice([6, 12, 24], n_notes)
    c["program"][notes] = 40
    return c


def planted_store(path: Path, songs: int = 12, notes: int = 120, songs_per_shard: int = 3,
                  seed: int = 0, chunk_tokens: int = 64, octave_signal: float = 0.0) -> Path:
    """Write the planted store; activations of both hooks are identical. With
    ``octave_signal``, dimensions 12-15 each carry that much of "octave 4" (a distributed
    code: no single dimension separates it as well as their sum)."""
    rng = np.random.default_rng(seed)
    names = [f"song{i:02d}" for i in range(songs)]
    writer = NetCDFStore(NetCDFStoreConfig(chunk_tokens=chunk_tokens)).create(
        path, hooks=[HOOK, "resid_post.2"], d_model=D_MODEL, songs=names, sources=names,
        attrs={"fingerprint": "planted"}, resume=False)
    for start in range(0, songs, songs_per_shard):
        stop = min(songs, start + songs_per_shard)
        parts = [song_coords(s, notes + int(rng.integers(0, 20)), rng) for s in range(start, stop)]
        coords = {k: np.concatenate([p[k] for p in parts]) for k in TOKEN_COORDS}
        n = len(coords["song"])
        acts = rng.normal(0, 0.1, (n, D_MODEL))
        is_note = coords["event_type"] == 3
        acts[np.flatnonzero(is_note), coords["pitch"][is_note] % 12] += SIGNAL
        octave4 = is_note & (coords["pitch"] // 12 == 5)
        acts[np.ix_(np.flatnonzero(octave4), np.arange(12, 16))] += octave_signal
        acts = np.repeat(acts[:, None, :], 2, axis=1).astype(np.float32)
        writer.write_shard(acts, coords, start, stop)
    writer.finish()
    return path


def planted_dictionary(folder: Path, hook: str = HOOK, octave_signal: float = 0.0) -> Path:
    """Latent i < 12 = relu(x_i - SIGNAL / 2): fires exactly on pitch class i. With
    ``octave_signal``, latent 12 reads the sum of dimensions 12-15 (the octave-4 code)."""
    model = Dictionary(D_MODEL, D_SAE, apply_b_dec_to_input=False)
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_enc.fill_(-SIGNAL / 2)
        for i in range(12):
            model.W_enc[i, i] = 1.0
            model.W_dec[i, i] = 1.0
        if octave_signal:
            model.W_enc[12:16, 12] = 0.5
            model.b_enc[12] = -octave_signal
            model.W_dec[12, 12:16] = 0.5
    return save_dictionary(folder, model, {"hook_point": hook})
