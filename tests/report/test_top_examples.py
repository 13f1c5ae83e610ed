"""top_examples: the streaming top-N and the token -> note mapping of its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import music_interpret as mi
from music_interpret.adapters.mmt.dataset import open_dataset
from music_interpret.adapters.mmt.windows import tokenize_song
from music_interpret.analyzers.context import AnalysisContext
from music_interpret.analyzers.examples import TopExamplesAnalyzer, TopExamplesConfig, running_top
from music_interpret.analyzers.examples_render import LatentJob, render_all
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


def _top_examples(run: Path, out: Path, workers: int) -> dict:
    ctx = AnalysisContext(store_path=run.parent.parent / "acts",
                          dictionaries={"resid_post.1": run / "train" / "dictionaries" / "resid_post.1"},
                          out_dir=out, data_dir=FIX / "data" / "bach" / "processed",
                          progress_factory=lambda it=None, **kw: it)
    cfg = TopExamplesConfig(n_examples=4, render_latents=3, render_sample=1, render_examples=2,
                            render_workers=workers)
    return TopExamplesAnalyzer(cfg).analyze(ctx)


def test_render_workers_write_what_serial_rendering_writes(small_run, tmp_path):
    import matplotlib.image

    serial, parallel = tmp_path / "w1" / "top_examples", tmp_path / "w2" / "top_examples"
    assert _top_examples(small_run, serial, 1) == _top_examples(small_run, parallel, 2)
    a, b = serial / "resid_post.1", parallel / "resid_post.1"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    index = json.loads((a / "index.json").read_text())
    assert len(index["latents"]) == 4
    assert any(e["midi"] for e in index["latents"]) and any("png" in e for e in index["latents"])
    for name in names:
        if name.endswith((".mid", ".txt", ".json")):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        elif name.endswith(".png"):
            np.testing.assert_array_equal(matplotlib.image.imread(a / name),
                                          matplotlib.image.imread(b / name))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_render_raises_its_own_error(tmp_path, workers):
    jobs = [LatentJob("h", tmp_path / folder, [], [], [], 90.0, {"latent": i})
            for i, folder in enumerate([".", "missing", "."])]
    with pytest.raises(FileNotFoundError, match="latent_1.txt"):
        render_all(jobs, workers)


def test_render_workers_must_be_positive():
    with pytest.raises(ValueError, match="render_workers must be positive or null, got 0"):
        TopExamplesConfig(render_workers=0)
