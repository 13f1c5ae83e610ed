"""Downstream loss: splicing a dictionary into MMT on held-out songs, alone and through the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.dataset import open_dataset
from music_interpret.adapters.mmt.model import FIELDS as MODEL_FIELDS
from music_interpret.learners.downstream import (
    FIELDS,
    KEYS,
    DownstreamEvaluator,
    DownstreamSettings,
    make_batches,
    recovered,
    scalars,
    select_windows,
)

from ..conftest import FIXTURES, REPO

MODEL = FIXTURES / "mmt" / "models" / "bach" / "ape-tiny"
DATA = FIXTURES / "mmt" / "data" / "bach" / "processed"
HOOK = "resid_post.1"


@pytest.fixture(scope="module")
def adapter() -> MMTAdapter:
    a = MMTAdapter()
    a.load(MODEL)
    return a


@pytest.fixture(scope="module")
def evaluator(adapter: MMTAdapter) -> DownstreamEvaluator:
    ds = open_dataset(DATA)
    ev = DownstreamEvaluator.for_songs(adapter, HOOK, ds.read, ds.names[:3],
                                       DownstreamSettings(max_windows=4, max_tokens=1500, batch_size=2))
    assert ev is not None
    return ev


class Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x)


def test_fields_match_the_model() -> None:
    assert FIELDS == MODEL_FIELDS and KEYS[-1] == "total"


def test_window_selection_is_bounded(adapter: MMTAdapter) -> None:
    ds = open_dataset(DATA)
    wins = select_windows(adapter, ds.read, ds.names, DownstreamSettings(max_windows=3, max_tokens=10**6))
    assert len(wins) == 3
    few = select_windows(adapter, ds.read, ds.names, DownstreamSettings(max_windows=100, max_tokens=400))
    assert len(few) >= 1 and (len(few) == 1 or sum(map(len, few)) <= 400)
    batches = make_batches(wins, 2)
    assert [len(b.codes) for b in batches] == [2, 1]
    assert int(sum(b.mask.sum() for b in batches)) == sum(map(len, wins))


def test_identity_recovers_everything_and_the_mean_nothing(evaluator: DownstreamEvaluator) -> None:
    ident = evaluator.evaluate(nn.Identity())
    for k in KEYS:
        assert ident["spliced"][k] == pytest.approx(ident["clean"][k], abs=1e-5)
        assert ident["ablated"][k] >= ident["clean"][k] - 1e-4
    assert ident["recovered"]["total"] == pytest.approx(1.0, abs=1e-4)
    assert ident["ablated"]["total"] > ident["clean"]["total"] + 0.1  # ablation hurts
    mean = evaluator.evaluate(Constant(evaluator.mean_activation()))
    assert mean["recovered"]["total"] == pytest.approx(0.0, abs=1e-4)
    assert mean["spliced"]["total"] == pytest.approx(mean["ablated"]["total"], abs=1e-5)
    noisy = evaluator.evaluate(Constant(torch.zeros_like(evaluator.mean_activation())))
    assert noisy["spliced"]["total"] > noisy["clean"]["total"]
    assert ident["tokens"] > 0 and 1 <= ident["windows"] <= 4 and ident["targets"] < ident["tokens"]
    tags = scalars(ident)
    assert {"total_recovered", "total_ce_spliced", "pitch_recovered", "beat_ce_clean"} <= set(tags)


def test_clean_loss_is_the_adapters_token_weighted_loss(evaluator: DownstreamEvaluator,
                                                        adapter: MMTAdapter) -> None:
    per = [adapter.run_with_patch(b, HOOK, lambda x: x) for b in evaluator.batches]
    w = evaluator.weights
    expect = sum(float(p["pitch"]) * n for p, n in zip(per, w, strict=True)) / sum(w)
    assert evaluator.clean()["pitch"] == pytest.approx(expect, rel=1e-6)


def test_notes_only_patches_note_tokens(adapter: MMTAdapter) -> None:
    ds = open_dataset(DATA)
    ev = DownstreamEvaluator.for_songs(adapter, HOOK, ds.read, ds.names[:1],
                                       DownstreamSettings(max_windows=1), notes_only=True)
    assert ev is not None
    b = ev.batches[0]
    assert ev.tokens == int((b.codes[..., 0] == 3).sum()) < int(b.mask.sum())


def test_recovered_edge_cases() -> None:
    assert recovered(1.0, 1.5, 3.0) == pytest.approx(0.75)
    assert recovered(1.0, 1.0, 1.0) is None
    assert recovered(1.0, float("nan"), 3.0) is None


def test_train_stage_reports_downstream(tmp_path: Path, device: str) -> None:
    """extract (fixture model) then train with downstream: metrics.json and TensorBoard."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        run: ds
        output_dir: {tmp_path / 'reports'}
        stages: [extract, train]
        device: {device}
        model: {{path: {MODEL}}}
        data: {{path: {DATA}}}
        extract: {{layers: [1], max_songs: 8, output: {tmp_path / 'acts'}}}
        train:
          learner: {{name: relu_l1, d_sae: 128, batch_size: 256, lr: 1e-3}}
          holdout_fraction: 0.25
          steps: 20
          log_every: 10
          downstream_every: 10
          downstream_windows: 2
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "music_interpret", "run", str(pipeline)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "reports" / "ds" / "train" / "dictionaries" / HOOK
    down = json.loads((folder / "metrics.json").read_text())["downstream"]
    assert down["step"] == 20 and 1 <= down["windows"] <= 2 and down["hook_point"] == HOOK
    assert set(down["recovered"]) == set(KEYS) and set(down["clean"]) == set(KEYS)
    assert down["ablated"]["total"] > down["clean"]["total"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "reports" / "ds" / "train" / "tensorboard" / HOOK))
    ea.Reload()
    assert [e.step for e in ea.Scalars("downstream/total_ce_spliced")] == [10, 20]
    assert "downstream/pitch_recovered" in ea.Tags()["scalars"] or down["recovered"]["pitch"] is None
