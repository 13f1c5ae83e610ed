"""probe: the split is the dictionary's hold-out, k-sparse probes find a planted k=2 code,
the input-embedding baseline matches a hand computation, the outputs and baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import xarray as xr

from music_interpret.adapters.mmt.embedding import codes_from_coords, embed_coords
from music_interpret.analyzers.context import AnalysisContext
from music_interpret.analyzers.probe_fit import MC_REPS, OVR_REPS, ProbeSettings, probe_attribute
from music_interpret.analyzers.probe_metrics import (
    auroc_with_ci,
    bootstrap_weights,
    macro_f1_from_confusion,
    scores_with_ci,
    song_index,
)
from music_interpret.analyzers.probing import ProbeAnalyzer, ProbeConfig
from music_interpret.analyzers.songsplit import dictionary_split
from music_interpret.errors import UserError
from music_interpret.learners.holdout import holdout_songs
from music_interpret.learners.io import load_dictionary, save_dictionary
from music_interpret.stores.netcdf import check_store

from ..conftest import FIXTURES
from . import HOOK, planted_dictionary, planted_store

CFG = dict(attributes=["pitch_class", "next.pitch_class"], max_tokens=1200, max_test_tokens=600,
           bootstrap=20, ks=[1, 2], max_iter=50)
HELD = {"holdout_fraction": 0.3, "seed": 5}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The planted store and a dictionary whose config records a hold-out (as the train stage)."""
    tmp = tmp_path_factory.mktemp("probe")
    store = planted_store(tmp / "store")
    folder = planted_dictionary(tmp / "dict")
    songs = check_store(store).songs
    held = [songs[i] for i in holdout_songs(songs, HELD["holdout_fraction"], HELD["seed"])]
    save_dictionary(folder, load_dictionary(folder), {
        "hook_point": HOOK, "training": {**HELD, "holdout_songs": held}})
    return store, folder


def test_split_is_the_dictionarys_holdout(planted: tuple[Path, Path]) -> None:
    store, folder = planted
    songs = check_store(store).songs
    config = load_dictionary(folder).config
    split = dictionary_split(songs, config, 0.5, seed=0)
    held = holdout_songs(songs, HELD["holdout_fraction"], HELD["seed"])
    assert split.source == "dictionary" and np.flatnonzero(split.test).tolist() == held
    assert "held out of training" in split.note and "all other songs" in split.note
    # without the names, the fraction and seed give the same songs
    bare = {"training": dict(HELD)}
    assert dictionary_split(songs, bare, 0.5, 0).test.tolist() == split.test.tolist()
    own = dictionary_split(songs, {"hook_point": HOOK}, 0.5, seed=0)
    assert own.source == "own" and own.note.startswith("own split")
    assert np.flatnonzero(own.test).tolist() == holdout_songs(songs, 0.5, 0)


def _or_code(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Label 1 is carried by latent 0 on half its tokens and latent 1 on the other half."""
    rng = np.random.default_rng(seed)
    n = 3000
    y = rng.integers(0, 3, n)
    songs = rng.integers(0, 30, n)
    test = songs < 8
    lat = np.maximum(rng.normal(0, 1, (n, 12)) - 1.5, 0)
    lat[:, :2] = 0
    half = rng.random(n) < 0.5
    lat[(y == 1) & half, 0] = rng.uniform(1, 2, ((y == 1) & half).sum())
    lat[(y == 1) & ~half, 1] = rng.uniform(1, 2, ((y == 1) & ~half).sum())
    lat[y == 2, 2] += 1.0
    raw = rng.normal(0, 1, (n, 6))
    return y, test, songs, {"latents": sp.csr_matrix(lat), "raw": raw}


def test_k_sparse_probe_finds_a_planted_two_latent_code() -> None:
    y, test, songs, inputs = _or_code()
    s = ProbeSettings(ks=[1, 2, 4], bootstrap=50, min_class_count=10)
    res = probe_attribute(y, test, songs, inputs, s, seed=0)
    assert res is not None and list(res.classes) == [0, 1, 2]
    latents, k = OVR_REPS.index("latents"), {"1": 0, "2": 1, "4": 2, "all": 3}
    auroc = res.ovr[1, latents, :, 0, 0]
    assert 0.7 < auroc[k["1"]] < 0.8  # one latent sees half of the label's tokens
    assert auroc[k["2"]] > 0.99 and res.ovr[1, latents, k["2"], 1, 0] > 0.95  # AUROC and F1
    assert res.ovr[1, latents, k["1"], 0, 2] < res.ovr[1, latents, k["2"], 0, 1]  # CIs apart
    assert set(res.selected[1, 2, :2]) == {0, 1}  # latents, first two picks
    # baselines: raw noise and a constant score stay at chance; probes fit to shuffled
    # labels are random directions, whose pooled interval covers chance
    for rep in ("raw", "constant"):
        assert abs(res.ovr[1, OVR_REPS.index(rep), k["2"], 0, 0] - 0.5) < 0.1, rep
    value, low, high = res.ovr[1, OVR_REPS.index("shuffled"), k["2"], 0]
    assert low < 0.5 < high and value < 0.8
    assert res.multiclass[MC_REPS.index("majority"), 0, 0] < 0.5
    assert np.isnan(res.multiclass[MC_REPS.index("embedding")]).all()  # not given
    assert not set(res.train_songs) & set(res.test_songs)


def test_bootstrap_metrics() -> None:
    conf = np.array([[5, 0], [5, 0]])
    assert macro_f1_from_confusion(conf) == pytest.approx((2 * 5 / 15 + 0) / 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    out = scores_with_ci(y, y, np.array([0, 0, 1, 1, 2, 2]), 2, 50, np.random.default_rng(0))
    np.testing.assert_allclose(out, 1.0)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    score, lab = rng.normal(size=200).round(1), rng.random(200) < 0.3
    idx, n = song_index(rng.integers(0, 9, 200))
    value = auroc_with_ci(score, lab, idx, n, bootstrap_weights(n, 30, rng))
    assert value[0] == pytest.approx(roc_auc_score(lab, score)) and value[1] <= value[0] <= value[2]


def test_embedding_baseline_matches_a_hand_computation(device: str) -> None:
    """Rebuilt embedding = the field rows summed by hand = resid_pre.0 minus the position embedding."""
    from music_interpret.adapters.mmt.adapter import MMTAdapter
    from music_interpret.adapters.mmt.dataset import open_dataset
    from music_interpret.interfaces import Batch

    adapter = MMTAdapter()
    adapter.load(FIXTURES / "mmt" / "models" / "bach" / "ape-tiny", device=device)
    data = open_dataset(FIXTURES / "mmt" / "data" / "bach" / "processed")
    _, windows = adapter.windows(data.read(data.names[0]))
    codes = windows[0].codes
    coords = {k: np.asarray(v) for k, v in adapter.token_metadata(codes).items()}
    np.testing.assert_array_equal(codes_from_coords(coords), codes)
    names, rows = adapter.input_embeddings()
    ours = embed_coords(names, rows, coords)
    net = adapter.model.net
    hand = sum(net.token_emb[f].emb.weight[torch.as_tensor(codes[:, f], device=device)]
               for f in range(6)).detach().cpu().numpy()
    np.testing.assert_allclose(ours, hand, atol=1e-5)
    batch = Batch(torch.as_tensor(codes[None]), torch.ones(1, len(codes), dtype=torch.bool))
    resid = adapter.run_with_hooks(batch, ["resid_pre.0"])["resid_pre.0"][0]
    pos = net.pos_emb(len(codes), resid.device)
    np.testing.assert_allclose(ours, (resid - pos).detach().cpu().numpy(), atol=1e-5)


def test_analyzer_outputs(planted: tuple[Path, Path], tmp_path: Path) -> None:
    store, folder = planted
    ctx = AnalysisContext(store_path=store, dictionaries={HOOK: folder}, out_dir=tmp_path,
                          progress_factory=_quiet)
    summary = ProbeAnalyzer(ProbeConfig(**CFG)).analyze(ctx)
    hook = summary["hooks"][HOOK]
    assert hook["split"] == "dictionary" and hook["attributes"]["pitch_class"]["raw"] > 0.95
    assert hook["attributes"]["pitch_class"]["ovr_latents_k1"] > 0.95  # one latent per class
    with xr.open_dataset(tmp_path / "probe.nc") as ds:
        assert ds.score.dims == ("hook", "attribute", "representation", "metric", "stat")
        assert list(ds.representation.values) == list(MC_REPS)
        assert str(ds.split_source.values[0]) == "dictionary"
        n_held = len(load_dictionary(folder).config["training"]["holdout_songs"])
        assert int(ds.test_songs.values[0]) == n_held
        assert list(ds.when.values) == ["t", "t+1"]
        acc = ds.score.sel(hook=HOOK, metric="accuracy", stat="value")
        assert float(acc.sel(attribute="next.pitch_class", representation="latents")) < 0.4
    with xr.open_dataset(tmp_path / "probe_ovr.nc") as ds:
        assert list(ds.k.values) == ["1", "2", "all"]
        assert ds.sizes["label"] == 24 and "pitch_class=C" in list(ds.label.values)
        assert int(ds.selected.sel(hook=HOOK, label="pitch_class=D", unit_representation="latents",
                                   rank=0)) == 2
    assert (tmp_path / "probe_ovr.csv").read_text().startswith("hook,label,attribute,when")
    assert "held out of training" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_config_errors() -> None:
    with pytest.raises(UserError, match="unknown attribute"):
        ProbeConfig(attributes=["tempo"])
    with pytest.raises(ValueError, match="ks"):
        ProbeConfig(ks=[4, 4])
    with pytest.raises(ValueError, match="tokens"):
        ProbeConfig(tokens="chords")


def _quiet(it: object = None, **kw: object) -> object:
    from tqdm.auto import tqdm

    return tqdm(it, disable=True, **kw)
