"""The Python API exported from ``music_interpret``: run, load_model, load_dictionary, encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import music_interpret as mi
from music_interpret.errors import UserError
from music_interpret.learners.dictionary import Dictionary, InputSpaceError
from music_interpret.learners.io import save_dictionary
from music_interpret.preprocess import Normalizer
from tests.conftest import FIXTURES
from tests.store import make_store, synthetic

MODEL = FIXTURES / "mmt" / "models" / "bach" / "ape-tiny"
DATA = FIXTURES / "mmt" / "data" / "quartets" / "processed"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    acts = synthetic(600, 8)
    acts[:, :, 0] = 1.0  # no token-index marker: norms alike across the store
    path, _ = make_store(tmp_path_factory.mktemp("api") / "s", acts, [350, 250],
                         chunk_tokens=64, layout="chunked")
    return path


@pytest.fixture(scope="module")
def dictionary(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = Dictionary(8, 20)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    x = mi.open_activations(store).activations.sel(hook="resid_post.1").values
    config = {"hook_point": "resid_post.1", "data": {"store_path": str(store)},
              "input": {"space": "raw", "mean_norm": float(np.linalg.norm(x, axis=1).mean())}}
    return save_dictionary(tmp_path_factory.mktemp("dict") / "d", model, config)


def test_exports() -> None:
    assert {"run", "load_model", "load_dictionary", "encode", "open_activations"} <= set(mi.__all__)
    assert mi.__version__ and mi.__version__ != "0+unknown"


def test_run_with_a_mapping_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = {"run": "api", "stages": ["extract"], "model": {"path": str(MODEL)},
           "data": {"path": str(DATA)}, "extract": {"layers": [0], "output": "acts"}}
    manifest = mi.run(raw, extract__max_songs=2, **{"extract.dtype": "bfloat16"})
    assert manifest["stages"]["extract"]["status"] == "done"
    ds = mi.open_activations(tmp_path / "acts")
    assert ds.sizes["songs"] == 2 and ds.activations.attrs["music_interpret_stored_dtype"] == "bfloat16"
    again = mi.run(raw, extract__max_songs=2, **{"extract.dtype": "bfloat16"})
    assert again["stages"]["extract"]["status"] == "skipped"
    with pytest.raises(UserError, match=r"extract.dtype: expected one of"):
        mi.run(raw, extract__dtype="float8")


def test_load_model() -> None:
    model = mi.load_model(MODEL)
    assert "resid_post.0" in model.hook_points() and model.d_model > 0
    with pytest.raises(UserError, match=r"unknown model adapter 'mmtt'"):
        mi.load_model(MODEL, adapter="mmtt")


def test_load_dictionary_is_for_inference(dictionary: Path) -> None:
    sae = mi.load_dictionary(dictionary)
    assert not any(p.requires_grad for p in sae.parameters())
    codes = sae.encode(torch.randn(4, 8))
    assert codes.grad_fn is None and codes.shape == (4, 20)


def test_encode_lazy_and_eager(store: Path, dictionary: Path) -> None:
    lazy = mi.encode(store, dictionary)
    assert lazy.dims == ("token", "latent") and hasattr(lazy.data, "dask")
    assert lazy.attrs["hook_point"] == "resid_post.1"
    ds = mi.open_activations(store, lazy=False)
    eager = mi.encode(ds, mi.load_dictionary(dictionary))
    assert isinstance(eager.data, np.ndarray)
    want = mi.load_dictionary(dictionary).encode(
        torch.from_numpy(ds.activations.sel(hook="resid_post.1").values)).numpy()
    np.testing.assert_array_equal(lazy.values, want)
    np.testing.assert_array_equal(eager.values, want)
    for name in ("token", "song", "event_type", "pitch"):
        np.testing.assert_array_equal(lazy[name].values, ds[name].values)
    notes = lazy.where(lazy.event_type == 3, drop=True)
    assert notes.sizes["token"] == int((ds.event_type == 3).sum())
    with pytest.raises(UserError, match=r"hook point 'resid_post.7' is not in the activations"):
        mi.encode(ds, dictionary, hook="resid_post.7")


def test_a_dictionary_knows_its_input_space(store: Path, dictionary: Path) -> None:
    sae = mi.load_dictionary(dictionary)
    x = torch.from_numpy(mi.open_activations(store).activations.sel(hook="resid_post.1").values)
    norm = Normalizer("unit_mean_norm", "resid_post.1", np.zeros(8),
                      np.full(8, 0.2 * np.sqrt(8) / float(x.norm(dim=1).mean())))
    y = norm.apply(x)
    with pytest.raises(InputSpaceError, match=r"raw activations of resid_post.1.*for_normalized"):
        sae.encode(y)
    in_loader_space = sae.for_normalized(norm)
    assert torch.allclose(in_loader_space.encode(y), sae.encode(x), atol=1e-5)
    assert torch.allclose(norm.invert(in_loader_space.decode(in_loader_space.encode(y))),
                          sae(x), atol=1e-4)
    sae.encode(y[:3])  # a handful of tokens is too few to judge
