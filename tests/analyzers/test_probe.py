"""probe: planted linear signal is found, baselines sit at chance, the split is by song."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from music_interpret.analyzers.context import AnalysisContext
from music_interpret.analyzers.probing import (
    ProbeAnalyzer,
    ProbeConfig,
    macro_f1_from_confusion,
    probe_attribute,
    read_rows,
    sample_tokens,
    scores_with_ci,
    song_split,
)
from music_interpret.errors import UserError
from music_interpret.learners.io import load_dictionary
from music_interpret.stores.netcdf import check_store

from . import HOOK, planted_dictionary, planted_store

CFG = dict(attributes=["pitch_class", "event_type"], max_tokens=1500, bootstrap=20, ks=[1, 4],
           test_fraction=0.3, max_iter=50)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("probe")
    return planted_store(tmp / "store"), planted_dictionary(tmp / "dict")


def test_planted_signal_and_baselines(planted: tuple[Path, Path], device: str) -> None:
    store, folder = planted
    info, cfg = check_store(store), ProbeConfig(**CFG)
    sample = sample_tokens(info, cfg.attributes, cfg.max_tokens, seed=0)
    test = song_split(info, sample.song, cfg.test_fraction, seed=0)
    raw, latents = read_rows(info, HOOK, sample.index, load_dictionary(folder, device).encode_host)
    res = probe_attribute(sample.codes["pitch_class"], test, sample.song, raw, latents, cfg, 0)
    assert res is not None and res["n_classes"] == 12
    assert not set(res["train_songs"]) & set(res["test_songs"])  # no song on both sides
    reps = cfg.representations
    acc = res["scores"][:, 0, 0]
    assert acc[reps.index("raw")] > 0.95 and acc[reps.index("latents")] > 0.95
    assert acc[reps.index("shuffled")] < 0.3 and acc[reps.index("majority")] < 0.3
    assert res["scores"][reps.index("raw"), 0, 1] <= acc[0] <= res["scores"][0, 0, 2]
    assert set(res["selected"]) <= set(range(12))  # the pitch-class latents are the informative ones


def test_read_rows_matches_store(planted: tuple[Path, Path]) -> None:
    from music_interpret.stores.netcdf import read_block

    info = check_store(planted[0])
    index = np.array([0, 5, 390, 391, info.n_tokens - 1])
    raw, _ = read_rows(info, HOOK, index, chunk=7)
    sizes = np.cumsum([0, *[e["tokens"] for e in info.manifest["shards"]]])
    for i, g in enumerate(index):
        shard = int(np.searchsorted(sizes, g, side="right") - 1)
        local = int(g - sizes[shard])
        np.testing.assert_array_equal(raw[i], read_block(info.shards[shard], 0, local, local + 1)[0])


def test_bootstrap_metrics() -> None:
    conf = np.array([[5, 0], [5, 0]])
    assert macro_f1_from_confusion(conf) == pytest.approx((2 * 5 / 15 + 0) / 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    out = scores_with_ci(y, y, np.array([0, 0, 1, 1, 2, 2]), 2, 50, np.random.default_rng(0))
    np.testing.assert_allclose(out, 1.0)


def test_analyzer_outputs(planted: tuple[Path, Path], tmp_path: Path) -> None:
    store, folder = planted
    ctx = AnalysisContext(store_path=store, dictionaries={HOOK: folder}, out_dir=tmp_path,
                          progress_factory=_quiet)
    summary = ProbeAnalyzer(ProbeConfig(**CFG)).analyze(ctx)
    assert summary["hooks"][HOOK]["pitch_class"]["raw"] > 0.95
    ds = xr.open_dataset(tmp_path / "probe.nc")
    assert ds.score.dims == ("hook", "attribute", "representation", "metric", "stat")
    assert list(ds.representation.values) == ["raw", "latents", "k1", "k4", "majority", "shuffled"]
    assert list(ds.metric.values) == ["accuracy", "macro_f1"]
    assert list(ds.stat.values) == ["value", "ci_low", "ci_high"]
    assert ds.attrs["test_songs"] >= 1 and ds.attrs["train_songs"] >= 1
    ds.close()
    assert (tmp_path / "probe.csv").read_text().startswith("hook,attribute,representation")
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_config_errors() -> None:
    with pytest.raises(UserError, match="unknown attribute"):
        ProbeConfig(attributes=["tempo"])
    with pytest.raises(ValueError, match="ks"):
        ProbeConfig(ks=[4, 4])


def _quiet(it: object = None, **kw: object) -> object:
    from tqdm.auto import tqdm

    return tqdm(it, disable=True, **kw)
