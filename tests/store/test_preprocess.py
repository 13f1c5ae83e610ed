"""Statistics, normalisation and the preprocess stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from music_interpret.activations import open_activations
from music_interpret.config import load_pipeline
from music_interpret.engine import Engine
from music_interpret.errors import UserError
from music_interpret.plugins import PluginRegistry
from music_interpret.preprocess import (
    Moments,
    Normalizer,
    compute_stats,
    load_normalizer,
    load_stats,
    materialize,
    write_normalization,
    write_stats,
)
from music_interpret.stores.netcdf import check_store

from . import HOOKS, make_store, synthetic

REPO = Path(__file__).resolve().parents[2]
D = 24
SHARDS = (700, 1300, 457)  # uneven, and not multiples of the block size below


def rel_close(a: np.ndarray | float, b: np.ndarray | float, rtol: float = 1e-9) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all(np.abs(a - b) <= rtol * np.maximum(np.abs(b), 1e-300)))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    acts = synthetic(sum(SHARDS), D, seed=1)
    acts[:, :, 0] = np.random.default_rng(2).normal(size=(len(acts), 2))  # no index marker here
    acts[:, 1, 1:] += 500.0  # large common offset: a naive sum-of-squares would lose digits
    acts[[5, 900, 2000], 0, 1:] *= 40.0  # three clear norm outliers on hook 0
    acts[:, 1, 3] = 2.5  # a constant dimension (std 0)
    return acts


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, data: np.ndarray) -> tuple[Path, dict]:
    return make_store(tmp_path_factory.mktemp("pp") / "store", data, SHARDS)


@pytest.fixture(scope="module")
def stats(store: tuple[Path, dict]):
    return compute_stats(store[0], block_tokens=300)


def test_moments_merge_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, (1000, 3))
    m = Moments()
    for part in np.array_split(x, [1, 7, 500, 501]):
        m.add(part)
    assert m.count == 1000
    assert rel_close(m.mean, x.mean(0), 1e-13)
    assert rel_close(m.std, x.std(0), 1e-9)


def test_stats_equal_numpy(stats, data: np.ndarray, store: tuple[Path, dict]) -> None:
    coords = store[1]
    assert list(stats["hook"].values) == list(HOOKS)
    for k, hook in enumerate(HOOKS):
        x = data[:, k].astype(np.float64)
        s = stats.sel(hook=hook)
        norms = np.linalg.norm(x, axis=1)
        assert int(s["count"]) == len(x)
        assert rel_close(s["mean"].values, x.mean(0))
        std = x.std(0)
        ok = std > 0
        assert rel_close(s["std"].values[ok], std[ok])
        assert np.all(s["std"].values[~ok] < 1e-9)
        assert rel_close(float(s["mean_norm"]), norms.mean())
        assert rel_close(float(s["norm_std"]), norms.std())
        assert rel_close(float(s["max_norm"]), norms.max())
        expected = np.count_nonzero(norms > 4.0 * norms.mean()) / len(x)
        assert float(s["outlier_fraction"]) == expected
    assert float(stats["outlier_fraction"].sel(hook=HOOKS[0])) == 3 / len(data)
    counts = np.bincount(coords["event_type"], minlength=5)
    assert stats["event_type_count"].values.tolist() == counts.tolist()
    assert stats.attrs["store_id"] == check_store(store[0]).manifest["store_id"]
    assert stats.attrs["outlier_factor"] == 4.0


def test_stats_do_not_depend_on_block_size(store: tuple[Path, dict], stats) -> None:
    other = compute_stats(store[0], hooks=[HOOKS[0]], block_tokens=10_000, outlier_factor=1.01)
    assert list(other["hook"].values) == [HOOKS[0]]
    assert rel_close(other["mean"].values[0], stats["mean"].values[0], 1e-12)
    assert other.attrs["outlier_factor"] == 1.01
    assert 0 < float(other["outlier_fraction"][0]) < 1


def test_write_and_load_stats(tmp_path: Path, stats) -> None:
    path = write_stats(stats, tmp_path / "s" / "stats.nc")
    assert [p.name for p in path.parent.iterdir()] == ["stats.nc"]  # no temporary left
    back = load_stats(path.parent)
    assert back.attrs["store_id"] == stats.attrs["store_id"]
    np.testing.assert_array_equal(back["mean"].values, stats["mean"].values)
    assert list(back["hook"].values) == list(HOOKS)
    with pytest.raises(UserError, match="not found"):
        load_stats(tmp_path / "nowhere.nc")


def test_standardize(stats, data: np.ndarray) -> None:
    norm = Normalizer.from_stats(stats, HOOKS[1], "standardize")
    y = norm.apply(data[:, 1].astype(np.float64))
    assert np.abs(y.mean(0)).max() < 1e-9
    std = y.std(0)
    assert np.allclose(np.delete(std, 3), 1.0, atol=1e-9)
    assert np.all(np.isfinite(y)) and np.abs(y[:, 3]).max() < 1e-9  # std 0: centred, not scaled
    np.testing.assert_allclose(norm.invert(y), data[:, 1], rtol=1e-12, atol=1e-9)


def test_unit_mean_norm(stats, data: np.ndarray) -> None:
    norm = Normalizer.from_stats(stats, HOOKS[0], "unit_mean_norm")
    y = norm.apply(data[:, 0].astype(np.float64))
    assert abs(np.linalg.norm(y, axis=1).mean() - np.sqrt(D)) < 1e-9
    assert not norm.shift.any() and np.all(norm.scale == norm.scale[0])


def test_normalizer_torch_numpy_and_inplace(stats, data: np.ndarray) -> None:
    norm = Normalizer.from_stats(stats, HOOKS[1], "standardize")
    x = data[:50, 1]
    y_np = norm.apply(x)
    y_t = norm.apply(torch.from_numpy(x))
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch.float32
    np.testing.assert_allclose(y_t.numpy(), y_np, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(norm.invert(y_t).numpy(), x, rtol=1e-5, atol=1e-3)
    z = x.copy()
    assert norm.apply_(z) is z
    np.testing.assert_allclose(z, y_np, rtol=1e-6, atol=1e-5)
    ident = Normalizer.from_stats(stats, HOOKS[1], "none")
    assert ident.is_identity and np.array_equal(ident.apply(x), x)
    with pytest.raises(UserError, match="not a mode"):
        Normalizer.from_stats(stats, HOOKS[1], "zscore")
    with pytest.raises(UserError, match="no statistics for hook point 'resid_post.7'"):
        Normalizer.from_stats(stats, "resid_post.7", "standardize")


def test_normalization_json(tmp_path: Path, stats) -> None:
    write_stats(stats, tmp_path / "stats.nc")
    write_normalization(tmp_path / "normalization.json", stats, "unit_mean_norm")
    info = json.loads((tmp_path / "normalization.json").read_text())
    assert info["mode"] == "unit_mean_norm" and info["stats_file"] == "stats.nc"
    assert set(info["hooks"]) == set(HOOKS)
    norm = load_normalizer(tmp_path, HOOKS[0])
    assert norm.mode == "unit_mean_norm"
    assert info["hooks"][HOOKS[0]]["scale_value"] == pytest.approx(norm.scale[0])


@pytest.mark.parametrize("mode", ["standardize", "unit_mean_norm"])
def test_materialize_equals_on_the_fly(tmp_path: Path, store: tuple[Path, dict], stats,
                                       data: np.ndarray, mode: str) -> None:
    out = materialize(store[0], tmp_path / "norm", mode, stats, block_tokens=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norm"]  # no temporary left
    info = check_store(out)
    src = check_store(store[0])
    assert info.manifest["store_id"] != src.manifest["store_id"]
    assert info.manifest["attrs"]["normalization"] == mode
    assert [s["tokens"] for s in info.manifest["shards"]] == list(SHARDS)
    ds = open_activations(out, lazy=False)
    for k, hook in enumerate(HOOKS):
        expected = Normalizer.from_stats(stats, hook, mode).apply(data[:, k])
        np.testing.assert_array_equal(ds.activations.sel(hook=hook).values, expected)
    np.testing.assert_array_equal(ds.event_type.values, store[1]["event_type"])
    # a second call replaces the copy
    materialize(store[0], out, "none", stats)
    again = open_activations(out, lazy=False)
    np.testing.assert_array_equal(again.activations.values, data)
    with pytest.raises(UserError, match="cannot overwrite"):
        materialize(store[0], store[0], mode, stats)


def test_materialize_rejects_foreign_stats(tmp_path: Path, store: tuple[Path, dict]) -> None:
    other, _ = make_store(tmp_path / "other", synthetic(300, D), [300])
    foreign = compute_stats(other)
    with pytest.raises(UserError, match="belong to store"):
        materialize(store[0], tmp_path / "out", "standardize", foreign)


def _pipeline(tmp_path: Path, sections: dict) -> Path:
    cfg = {"run": "t", "output_dir": str(tmp_path / "reports"), **sections}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_stage_writes_stats_next_to_store(tmp_path: Path, data: np.ndarray) -> None:
    store, _ = make_store(tmp_path / "acts", data, SHARDS)
    pipeline = _pipeline(tmp_path, {
        "stages": ["preprocess"], "extract": {"output": str(store)},
        "preprocess": {"normalization": "standardize", "block_tokens": 400, "materialize": True},
    })
    registry = PluginRegistry()
    manifest = Engine(load_pipeline(pipeline, registry), registry, log=lambda _: None).run()
    out = store / "stats"
    assert manifest["stages"]["preprocess"]["output"] == str(out)
    assert {"stats.nc", "normalization.json", "normalized", ".stage.json"} <= {
        p.name for p in out.iterdir()}
    summary = manifest["stages"]["preprocess"]["summary"]
    assert summary["hooks"][HOOKS[0]]["count"] == len(data)
    assert summary["hooks"][HOOKS[0]]["outlier_fraction"] == pytest.approx(3 / len(data))
    assert json.loads((out / "normalization.json").read_text())["mode"] == "standardize"
    assert load_stats(out).attrs["store_id"] == check_store(store).manifest["store_id"]
    check_store(out / "normalized")
    check_store(store)  # the stats folder does not disturb the store


def test_stage_needs_extract_section(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, {"stages": ["preprocess"]})
    registry = PluginRegistry()
    with pytest.raises(UserError, match="'extract' section"):
        Engine(load_pipeline(pipeline, registry), registry, log=lambda _: None).run()


def test_stage_config_is_checked(tmp_path: Path) -> None:
    from music_interpret.errors import ConfigError

    pipeline = _pipeline(tmp_path, {"stages": ["preprocess"], "extract": {"output": "x"},
                                    "preprocess": {"normalization": "zscore", "outlier_factor": -1}})
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline, PluginRegistry())
    assert "preprocess.normalization" in str(err.value)


@pytest.mark.slow
def test_extract_then_preprocess(tmp_path: Path) -> None:
    """The real chain on the MMT fixture: stats land in <store>/stats."""
    fixtures = REPO / "tests" / "fixtures" / "mmt"
    pipeline = _pipeline(tmp_path, {
        "stages": ["extract", "preprocess"],
        "model": {"path": str(fixtures / "models" / "bach" / "ape-tiny")},
        "data": {"path": str(fixtures / "data" / "quartets" / "processed")},
        "extract": {"layers": [1], "max_songs": 2, "output": str(tmp_path / "acts")},
    })
    registry = PluginRegistry()
    Engine(load_pipeline(pipeline, registry), registry, log=lambda _: None).run()
    stats = load_stats(tmp_path / "acts" / "stats")
    ds = open_activations(tmp_path / "acts", lazy=False)
    x = ds.activations.sel(hook="resid_post.1").values.astype(np.float64)
    assert rel_close(stats["mean"].sel(hook="resid_post.1").values, x.mean(0), 1e-9)
    assert rel_close(float(stats["mean_norm"][0]), np.linalg.norm(x, axis=1).mean())
