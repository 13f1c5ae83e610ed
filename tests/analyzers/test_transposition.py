"""transposition: a planted invariant latent and a planted equivariant family are classified
right (synthetic codes); the analyzer runs the fixture model on transposed held-out songs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import xarray as xr

from music_interpret.analyzers.context import AnalysisContext
from music_interpret.analyzers.transposition import TranspositionAnalyzer, TranspositionConfig
from music_interpret.analyzers.transposition_stats import (
    CLASSES,
    best_pitch,
    classify,
    partners,
    shift_stats,
    shuffled_label_counts,
)
from music_interpret.learners.dictionary import Dictionary
from music_interpret.learners.io import save_dictionary
from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

from ..conftest import FIXTURES

MODEL = FIXTURES / "mmt" / "models" / "bach" / "ape-tiny"
DATA = FIXTURES / "mmt" / "data" / "bach" / "processed"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def planted_codes(pitch: np.ndarray, shift: int, rng: np.random.Generator,
                  r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Latent 0 invariant (reads r); latents 1-12 one per pitch class (value v); latent 13
    noise; latent 14 rare."""
    n = len(pitch)
    out = np.zeros((n, 15))
    out[:, 0] = r
    out[np.arange(n), 1 + (pitch + shift) % 12] = v
    out[:, 13] = np.maximum(rng.normal(size=n), 0)
    out[:3, 14] = 1.0
    return out


def test_planted_invariant_and_equivariant_latents_are_classified() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    pitch = rng.integers(55, 80, n)
    r, v = np.abs(rng.normal(size=n)), 1 + rng.random(n)
    a = sp.csr_matrix(planted_codes(pitch, 0, rng, r, v))
    best = best_pitch(a, pitch)
    assert [best[1 + pc] % 12 for pc in range(12)] == list(range(12))
    stats = [shift_stats(a, sp.csr_matrix(planted_codes(pitch, k, rng, r, v)), best, k)
             for k in (-5, 2, 7)]
    assert stats[1].partner[1] == 3 and stats[1].match[1]  # C's partner at +2 is D
    fires = np.asarray((a > 0).sum(0)).reshape(-1)
    c = classify(stats, fires, min_fires=10, invariant_threshold=0.8, equivariant_threshold=0.8)
    labels = [CLASSES[i] for i in c.label]
    assert labels[0] == "invariant" and c.invariance[0] == pytest.approx(1.0)
    assert labels[1:13] == ["equivariant"] * 12 and np.allclose(c.equivariance[1:13], 1.0)
    assert labels[13] == "neither" and labels[14] == "rare"
    # chance label matches rarely make a latent look equivariant
    chance = shuffled_label_counts(stats, best, fires, 10, 0.8, 0.8, n_perm=20, seed=0)
    assert chance["equivariant"] < 3 and chance["invariant"] == 1


def test_dense_and_sparse_partner_search_agree() -> None:
    rng = np.random.default_rng(1)
    a = np.maximum(rng.normal(size=(400, 8)) - 0.5, 0)
    b = np.roll(a, 1, axis=1) + 0.01 * np.maximum(rng.normal(size=a.shape), 0)
    dense, sparse = partners(a, b), partners(sp.csr_matrix(a), sp.csr_matrix(b))
    np.testing.assert_array_equal(dense[0], sparse[0])
    np.testing.assert_allclose(dense[1], sparse[1], rtol=1e-9)
    assert list(dense[0]) == [1, 2, 3, 4, 5, 6, 7, 0]


def invariant_direction(adapter: object, hook: str, low: int, high: int, seed: int = 0) -> torch.Tensor:
    """A unit direction orthogonal to every difference of the pitch embeddings of MIDI
    pitches low..high (fewer than d_model of them): at resid_pre.0 its reading cannot
    change under transposition."""
    w = adapter.model.net.token_emb[3].emb.weight.detach().float().cpu()[low + 1: high + 2]
    diffs = (w[1:] - w[:1]).double()
    q, _ = torch.linalg.qr(diffs.T)
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed)).double()
    v -= q @ (q.T @ v)
    return (v / v.norm()).float()


def fake_store(path: Path, songs: list[str], hook: str, d_model: int) -> Path:
    """A one-shard store naming ``songs`` (the analyzer reads only its song table)."""
    writer = NetCDFStore(NetCDFStoreConfig(chunk_tokens=64)).create(
        path, hooks=[hook], d_model=d_model, songs=songs, sources=songs, attrs={}, resume=False)
    n = 4
    coords = {k: np.full(n, -1, np.int64) for k in TOKEN_COORDS}
    coords.update(song=np.zeros(n, np.int64), song_token=np.arange(n), seq_pos=np.arange(n),
                  window=np.zeros(n, np.int64), event_type=np.zeros(n, np.int64))
    writer.write_shard(np.zeros((n, 1, d_model), np.float32), coords, 0, len(songs))
    writer.finish()
    return path


def test_analyzer_runs_the_model_on_transposed_songs(tmp_path: Path, device: str) -> None:
    from music_interpret.adapters.mmt.adapter import MMTAdapter
    from music_interpret.adapters.mmt.dataset import open_dataset
    from music_interpret.config import PluginRef
    from music_interpret.plugins import PluginRegistry

    hook = "resid_pre.0"
    names = list(open_dataset(DATA).names)
    held = names[:2]
    adapter = MMTAdapter()
    adapter.load(MODEL)
    d = adapter.d_model
    shifts = [-2, 3]
    pitches = np.concatenate([open_dataset(DATA).read(n)[:, 2] for n in held])
    direction = invariant_direction(adapter, hook, pitches.min() + min(shifts),
                                    pitches.max() + max(shifts))
    dictionary = Dictionary(d, 3, apply_b_dec_to_input=False)
    with torch.no_grad():
        dictionary.W_enc[:, 0] = direction * 10  # exactly key-invariant at resid_pre.0
        dictionary.W_enc[:, 1] = adapter.model.net.token_emb[3].emb.weight[61 + 1].detach()  # C#4
        dictionary.W_enc[:, 2] = -direction * 10
    folder = save_dictionary(tmp_path / "dict", dictionary, {
        "hook_point": hook, "training": {"holdout_fraction": 0.1, "seed": 0, "holdout_songs": held}})
    store = fake_store(tmp_path / "store", names, hook, d)
    ctx = AnalysisContext(store_path=store, dictionaries={hook: folder}, out_dir=tmp_path / "out",
                          model_dir=MODEL, data_dir=DATA, device=device,
                          model_adapter=PluginRef("model_adapter", "mmt", None),
                          registry=PluginRegistry())
    cfg = TranspositionConfig(shifts=shifts, max_songs=2, min_fires=5, n_perm=3)
    summary = TranspositionAnalyzer(cfg).analyze(ctx)[hook]
    assert summary["songs"] == 2 and "held out of training" in summary["split"]
    with xr.open_dataset(tmp_path / "out" / f"{hook}.nc") as ds:
        assert list(ds.semitones.values) == [-2, 3] and ds.sizes["latent"] == 3
        assert str(ds["class"].values[0]) == "invariant"
        assert float(ds.invariance.values[0]) == pytest.approx(1.0, abs=1e-4)
        assert float(ds.invariance.values[1]) < 0.9  # reads a pitch row: moves with the key
    csv_text = (tmp_path / "out" / f"{hook}.csv").read_text()
    assert csv_text.startswith("latent,class,invariance")
    assert "random-init" in (tmp_path / "out" / "summary.md").read_text()
    assert set(summary["controls"]["random_init"]) == set(CLASSES)
    json.dumps(summary)  # the manifest can hold it
