"""Training on normalised inputs (preprocess statistics) still saves a raw-space dictionary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from music_interpret.learners.holdout import holdout_songs
from music_interpret.learners.io import load_dictionary
from music_interpret.preprocess import compute_stats, write_normalization, write_stats
from music_interpret.stores.netcdf import check_store

from .conftest import HOOKS, pipeline
from .test_training import raw_tokens, run_pipeline


@pytest.mark.parametrize("mode", ["standardize", "unit_mean_norm"])
def test_auto_normalisation_is_folded_back(tmp_path: Path, store: Path, mode: str) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    stats = compute_stats(copy)
    write_stats(stats, copy / "stats" / "stats.nc")
    write_normalization(copy / "stats" / "normalization.json", stats, mode)
    train = """
    learner: {name: relu_l1, d_sae: 32, batch_size: 128, lr: 3e-3, l1_coeff: 0.5}
    hooks: [resid_post.1]
    steps: 100
    log_every: 50
    """
    proc = run_pipeline(pipeline(tmp_path, copy, train))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "reports" / "r" / "train" / "dictionaries" / HOOKS[1]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["normalization"]["loader"]["mode"] == mode
    sae = load_dictionary(folder)
    x = raw_tokens(copy, HOOKS[1], holdout_songs(check_store(copy).songs, 0.1, 0))
    fvu = ((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    holdout = json.loads((folder / "metrics.json").read_text())["holdout"]
    assert fvu == pytest.approx(holdout["fvu_raw"], rel=1e-3) and fvu < 0.6
    if mode == "unit_mean_norm":  # isotropic scaling: FVU is the same in both spaces
        assert holdout["fvu"] == pytest.approx(holdout["fvu_raw"], rel=1e-6)
    assert torch.isfinite(sae.W_enc).all()
