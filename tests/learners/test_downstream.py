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
from music_interpret.interfaces import Batch
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


# -- zero ablation, KL and bootstrap intervals (SAEBench-style faithfulness) ------------------


def test_identity_dictionary_is_perfectly_faithful(evaluator: DownstreamEvaluator) -> None:
    ident = evaluator.evaluate(nn.Identity())
    for k in KEYS:
        assert ident["delta_ce"][k] == pytest.approx(0.0, abs=1e-6)
        assert ident["kl"][k] == pytest.approx(0.0, abs=1e-7)
        assert ident["ci"]["delta_ce"][k] == pytest.approx([0.0, 0.0], abs=1e-6)
        assert ident["kl_zero_ablated"][k] >= ident["kl"][k]
    assert ident["zero_ablated"]["total"] > ident["clean"]["total"] + 0.1
    assert ident["recovered_zero"]["total"] == pytest.approx(1.0, abs=1e-5)
    assert ident["kl_recovered_zero"]["total"] == pytest.approx(1.0, abs=1e-6)
    assert ident["ci"]["recovered_zero"]["total"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ident["ci"]["unit"] == "song" and ident["songs"] == len({s for b in evaluator.batches
                                                                     for s in b.song})
    zero = evaluator.evaluate(Constant(torch.zeros_like(evaluator.mean_activation())))
    assert zero["spliced"]["total"] == pytest.approx(zero["zero_ablated"]["total"], abs=1e-5)
    assert zero["recovered_zero"]["total"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_recovered_zero"]["total"] == pytest.approx(0.0, abs=1e-5)
    tags = scalars(ident)
    assert {"total_recovered_zero", "pitch_ce_zero_ablated", "total_kl", "beat_delta_ce"} <= set(tags)


def toy_evaluator(songs: int, notes_only: bool = False) -> tuple[object, DownstreamEvaluator]:
    from ..analyzers.toy_linear import LinearToy, toy_windows

    adapter = LinearToy(seed=3)
    wins = toy_windows(songs, 30, seed=4)
    batches = make_batches([w for w, _, _ in wins], 2, [s for _, _, s in wins])
    return adapter, DownstreamEvaluator(adapter, "h", batches, notes_only=notes_only, bootstrap=400)


def test_zero_ablation_and_kl_by_hand() -> None:
    """The toy's logits are x @ R without bias: zero ablation gives uniform predictions, so
    CE = log V per field and KL(clean || zero) = log V - H(p_clean)."""
    import math

    from ..analyzers.toy_linear import VOCAB

    adapter, ev = toy_evaluator(3)
    half = ev.evaluate(_Scale(0.5))
    kl_zero, kl_half, n = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0
    for b in ev.batches:
        x = adapter.run_with_hooks(b, ["h"])["h"]
        keep = b.mask[:, 1:]
        n += int(keep.sum())
        for f, name in enumerate(FIELDS):
            lp = torch.log_softmax((x @ adapter.readout[name])[:, :-1].double(), -1)[keep]
            lq = torch.log_softmax((0.5 * x @ adapter.readout[name])[:, :-1].double(), -1)[keep]
            kl_zero[f] += (lp.exp() * (lp + math.log(VOCAB[f]))).sum()
            kl_half[f] += (lp.exp() * (lp - lq)).sum()
    for f, name in enumerate(FIELDS):
        assert half["zero_ablated"][name] == pytest.approx(math.log(VOCAB[f]), rel=1e-6)
        assert half["kl_zero_ablated"][name] == pytest.approx(float(kl_zero[f]) / n, rel=1e-5)
        assert half["kl"][name] == pytest.approx(float(kl_half[f]) / n, rel=1e-5)
    assert half["zero_ablated"]["total"] == pytest.approx(sum(math.log(v) for v in VOCAB), rel=1e-6)
    assert half["kl"]["total"] == pytest.approx(float(kl_half.sum()) / n, rel=1e-5)
    # the toy's targets are random, so its predictions are worse than uniform: zero ablation
    # does not raise the loss and the fraction recovered is undefined
    assert half["zero_ablated"]["total"] < half["clean"]["total"]
    assert half["recovered_zero"]["total"] is None


def test_bootstrap_over_two_songs_spans_the_two_songs() -> None:
    """With two songs a resample holds song A twice, B twice (a quarter each) or both, so the
    95% interval of ΔCE runs exactly from one song's ΔCE to the other's."""
    _, ev = toy_evaluator(2)
    both = ev.evaluate(_Scale(0.5))
    per_song = []
    for s in (0, 1):
        rows = [(b, [i for i, g in enumerate(b.song) if g == s]) for b in ev.batches]
        sub = [Batch(b.codes[i], b.mask[i], song=[s] * len(i)) for b, i in rows if i]
        alone = DownstreamEvaluator(ev.adapter, "h", sub, bootstrap=0).evaluate(_Scale(0.5))
        per_song.append(alone["delta_ce"]["total"])
    assert both["songs"] == 2 and both["ci"]["unit"] == "song"
    # equal up to float32 rounding of the forward, which depends on the batches' composition
    # (the per-song runs batch one song's windows only); a percentile interpolated between
    # resamples would be off by a sizeable share of the two songs' gap (2.2 nats here)
    assert both["ci"]["delta_ce"]["total"] == pytest.approx(sorted(per_song), rel=1e-6)
    assert min(per_song) < both["delta_ce"]["total"] < max(per_song)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x
