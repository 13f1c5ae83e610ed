"""Metrics against hand computations."""

from __future__ import annotations

import pytest
import torch

from music_interpret.learners import metrics as M


def test_reconstruction_metrics() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    r = torch.tensor([[1.0, 2.5], [2.0, 4.0], [5.0, 8.0]])
    sse = 0.25 + 1.0 + 1.0
    var = (4 + 0 + 4) + (9 + 1 + 16)  # column means 3 and 5
    assert M.fvu(x, r).item() == pytest.approx(sse / var)
    assert M.explained_variance(x, r).item() == pytest.approx(1 - sse / var)
    assert M.mse(x, r).item() == pytest.approx(sse / 6)


def test_sparsity_metrics() -> None:
    f = torch.tensor([[0.0, 2.0, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    assert M.l0(f).item() == pytest.approx(5 / 3)
    assert M.l1(f).item() == pytest.approx(8 / 3)
    dens = M.density((f != 0).sum(0), 3)
    assert dens.tolist() == pytest.approx([0, 2 / 3, 1, 0])
    assert M.dead_fraction(dens).item() == 0.5
    assert M.dense_fraction(dens, 0.7).item() == 0.25
    assert M.log10_density(dens).tolist() == pytest.approx([-10, torch.log10(torch.tensor(2 / 3)).item(), 0, -10],
                                                           abs=1e-6)
    hist = M.density_histogram(dens, bins=10)
    assert sum(hist["counts"]) == 4 and hist["counts"][0] == 2 and hist["counts"][-1] == 2


def test_firing_tracker_window() -> None:
    t = M.FiringTracker(3, "cpu")
    t.update(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    t.update(torch.tensor([[0.0, 2.0, 0]]))
    assert t.since_fired.tolist() == [1, 0, 3]
    assert t.dead(3).tolist() == [False, False, True] and t.dead(1).tolist() == [True, False, True]
    assert t.reset_counts().tolist() == pytest.approx([1 / 3, 1 / 3, 0]) and t.tokens == 0


def test_eval_accumulator_matches_one_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    f = torch.relu(torch.randn(40, 7, generator=g))
    acc = M.EvalAccumulator(5, 7, "cpu")
    for i in range(0, 40, 13):
        acc.update(x[i:i + 13], r[i:i + 13], f[i:i + 13], raw_scale=torch.full((5,), 2.0))
    out = acc.result(0.6)
    assert out["tokens"] == 40 and out["fvu"] == pytest.approx(M.fvu(x, r).item(), rel=1e-5)
    assert out["fvu_raw"] == pytest.approx(out["fvu"], rel=1e-9)  # isotropic scale: same FVU
    assert out["l0"] == pytest.approx(M.l0(f).item()) and out["l1"] == pytest.approx(M.l1(f).item(), rel=1e-5)
    dens = M.density((f != 0).sum(0), 40)
    assert out["dense_fraction"] == pytest.approx(M.dense_fraction(dens, 0.6).item())
