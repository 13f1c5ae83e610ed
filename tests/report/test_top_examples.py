"""top_examples: the streaming top-N and the token -> note mapping of its outputs."""

from __future__ import annotations

import json

import numpy as np
import torch
import xarray as xr

import music_interpret as mi
from music_interpret.adapters.mmt.dataset import open_dataset
from music_interpret.adapters.mmt.windows import tokenize_song
from music_interpret.analyzers.examples import running_top
from music_interpret.learners.io import load_dictionary

from .conftest import FIX


def test_running_top_equals_a_dense_topk():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 6)).astype(np.float32)
    w = torch.from_numpy(rng.normal(size=(6, 40)).astype(np.float32))

    def encode(t: torch.Tensor) -> torch.Tensor:
        return torch.relu(t @ w)

    blocks = ((s, x[s : s + 97]) for s in range(0, len(x), 97))
    top = running_top(encode, blocks, 40, 5)
    dense = encode(torch.from_numpy(x))
    values, tokens = dense.topk(5, dim=0)
    torch.testing.assert_close(top.values, values)
    assert (dense[top.tokens, torch.arange(40)] == values).all()
    assert (top.active == (dense > 0).sum(0)).all() and top.seen == 1000
    assert tokens.shape == top.tokens.shape


def test_examples_point_at_their_notes(small_run):
    folder = small_run / "analyze" / "top_examples" / "resid_post.1"
    te = xr.open_dataset(folder / "top_examples.nc").load()
    store = mi.open_activations(small_run.parent.parent / "acts", lazy=False)
    dictionary = load_dictionary(small_run / "train" / "dictionaries" / "resid_post.1")
    dataset = open_dataset(FIX / "data" / "bach" / "processed")
    valid = te.token.values >= 0
    assert valid[:, 0].sum() == (te.max_activation > 0).sum()
    latents, ranks = np.nonzero(valid)
    x = torch.from_numpy(store.activations.sel(hook="resid_post.1").values[te.token.values[valid]])
    with torch.no_grad():
        codes = dictionary.encode(x).numpy()
    np.testing.assert_allclose(codes[np.arange(len(latents)), latents],
                               te.activation.values[valid], rtol=1e-4, atol=1e-5)
    assert (np.diff(te.activation.values, axis=1) <= 0).all()
    checked = 0
    for latent, rank in zip(latents[:200], ranks[:200], strict=True):
        ex = te.isel(latent=latent, rank=rank)
        if int(ex.event_type) != 3:
            continue
        song = tokenize_song(dataset.read(str(te.song_name.values[int(ex.song)])))
        note = song.notes[song.note[int(ex.song_token)]]
        assert (note[0], note[1], note[2]) == (int(ex.beat), int(ex.position), int(ex.pitch))
        checked += 1
    assert checked
    index = json.loads((folder / "index.json").read_text())
    assert index["latents"] and all((folder / e["txt"]).exists() for e in index["latents"])
    assert int(te.rendered.sum()) == len(index["latents"])
