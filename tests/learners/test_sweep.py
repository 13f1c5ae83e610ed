"""Sweeps: many dictionaries on the same batches, equal to separate runs; stage layout; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from music_interpret.errors import UserError
from music_interpret.learners.io import load_dictionary
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.sweep import SweepTrainer, curve, sweep_learners
from music_interpret.learners.topk import TopKConfig, TopKLearner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader

from .conftest import HOOKS, pipeline
from .test_training import run_pipeline

SETTINGS = TrainSettings(steps=30, log_every=10, checkpoint_every=10)


def loader(store: Path) -> ActivationLoader:
    return ActivationLoader(store, HOOKS[0], 64, drop_last=True, epochs=None, prefetch=0,
                            block_tokens=256)


def sample(store: Path) -> torch.Tensor:
    return next(iter(ActivationLoader(store, HOOKS[0], 512, seed=1, prefetch=0)))


class Interrupted:
    """A loader that raises after ``stop`` batches (a crash mid-run)."""

    def __init__(self, inner: ActivationLoader, stop: int) -> None:
        self.inner, self.stop, self.d_model = inner, stop, inner.d_model

    def __iter__(self):  # noqa: ANN204
        for i, x in enumerate(self.inner):
            if i == self.stop:
                raise KeyboardInterrupt
            yield x

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def base() -> ReluL1Learner:
    return ReluL1Learner(ReluL1Config(d_sae=24, batch_size=64, lr=3e-3, l1_coeff=0.5))


def test_members_equal_separate_runs_on_the_same_batches(tmp_path: Path, store: Path) -> None:
    members = sweep_learners(base(), {"l1_coeff": [0.1, 2.0]})
    assert [name for name, _ in members] == ["l1_coeff=0.1", "l1_coeff=2"]
    x0 = sample(store)
    results = SweepTrainer(members, loader(store), SETTINGS, checkpoint=tmp_path / "s.pt",
                           tb_dir=lambda name: tmp_path / "tb" / name, init_sample=lambda: x0).run()
    for name, learner in members:
        alone = Trainer(learner, loader(store), SETTINGS, checkpoint=tmp_path / f"{name}.pt",
                        tb_dir=None, init_sample=lambda: x0).run()
        swept = results[name]
        assert swept.input_scale == alone.input_scale and swept.tokens == alone.tokens == 30 * 64
        for key, value in alone.model.state_dict().items():
            assert torch.equal(swept.model.state_dict()[key], value), (name, key)
    assert (tmp_path / "tb" / "l1_coeff=2").is_dir()
    l0 = {n: float((r.model.encode(x0 * r.input_scale) != 0).float().sum(-1).mean())
          for n, r in results.items()}
    assert l0["l1_coeff=0.1"] > l0["l1_coeff=2"]


def test_sweep_resumes_from_its_checkpoint(tmp_path: Path, store: Path) -> None:
    members = sweep_learners(TopKLearner(TopKConfig(d_sae=24, k=3, batch_size=64, dead_tokens=500)),
                             {"k": [2, 4]})
    assert [m.config.k for _, m in members] == [2, 4]
    x0 = sample(store)
    kw = {"tb_dir": lambda name: None, "init_sample": lambda: x0}
    once = SweepTrainer(members, loader(store), SETTINGS, checkpoint=tmp_path / "a.pt", **kw).run()
    ckpt = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        SweepTrainer(members, Interrupted(loader(store), 25), SETTINGS, checkpoint=ckpt, **kw).run()
    assert torch.load(ckpt, weights_only=True)["step"] == 20
    again = SweepTrainer(members, loader(store), SETTINGS, checkpoint=ckpt, **kw).run()
    for name in once:
        a, b = once[name].model.state_dict(), again[name].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_grid_members_share_batches_and_take_their_own_seed(tmp_path: Path, store: Path) -> None:
    """A two-option grid trains the product; a swept seed seeds only the initialisation."""
    import dataclasses

    members = sweep_learners(base(), {"d_sae": [16.0, 24], "seed": [0, 3]})
    assert [n for n, _ in members] == ["d_sae=16,seed=0", "d_sae=16,seed=3", "d_sae=24,seed=0",
                                       "d_sae=24,seed=3"]
    assert all(isinstance(m.config.d_sae, int) for _, m in members)
    x0 = sample(store)
    short = dataclasses.replace(SETTINGS, steps=10)
    results = SweepTrainer(members, loader(store), short, checkpoint=tmp_path / "g.pt",
                           tb_dir=lambda name: None, init_sample=lambda: x0).run()
    name, learner = members[1]  # d_sae=16, seed=3: its own initialisation, the run's batches
    alone = Trainer(learner, loader(store), dataclasses.replace(short, seed=3),
                    checkpoint=tmp_path / "alone.pt", tb_dir=None, init_sample=lambda: x0).run()
    for key, value in alone.model.state_dict().items():
        assert torch.equal(results[name].model.state_dict()[key], value), key
    assert not torch.equal(results["d_sae=16,seed=0"].model.W_dec, results[name].model.W_dec)


def test_sweep_options_are_checked() -> None:
    with pytest.raises(UserError, match="one or two options"):
        sweep_learners(base(), {"l1_coeff": [1.0], "lr": [1e-3], "d_sae": [8]})
    with pytest.raises(UserError, match="batch_size"):
        sweep_learners(base(), {"batch_size": [32, 64]})
    with pytest.raises(UserError, match="not an option of learner 'relu_l1'"):
        sweep_learners(base(), {"k": [4]})
    with pytest.raises(UserError, match="not an integer"):
        sweep_learners(TopKLearner(TopKConfig(d_sae=8, k=4)), {"k": [2.5]})
    with pytest.raises(UserError, match="k=16"):
        sweep_learners(TopKLearner(TopKConfig(d_sae=8, k=4)), {"k": [16.0]})
    with pytest.raises(UserError, match="distinct"):
        sweep_learners(base(), {"l1_coeff": [1.0, 1.0]})


def test_curve_sorts_by_l0() -> None:
    rows = curve({"a": {"holdout": {"l0": 9.0, "fvu": 0.1}},
                  "b": {"holdout": {"l0": 2.0, "fvu": 0.4},
                        "downstream": {"recovered": {"total": 0.5}}}})
    assert [r["label"] for r in rows] == ["b", "a"] and rows[0]["total_recovered"] == 0.5


def test_sweep_through_the_stage(tmp_path: Path, store: Path) -> None:
    train = """
    learner: {name: relu_l1, d_sae: 32, batch_size: 128, lr: 3e-3}
    sweep: {l1_coeff: [0.05, 0.5, 5]}
    hooks: [resid_post.1]
    steps: 60
    log_every: 20
    block_tokens: 256
    """
    proc = run_pipeline(pipeline(tmp_path, store, train))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "reports" / "r" / "train" / "dictionaries" / "resid_post.1"
    names = ["l1_coeff=0.05", "l1_coeff=0.5", "l1_coeff=5"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "sweep.json"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["param"] == "l1_coeff" and len(sweep["curve"]) == 3
    assert [r["label"] for r in sweep["curve"]] == names[::-1]  # more L1, fewer active latents
    l0 = [r["l0"] for r in sweep["curve"]]
    assert l0 == sorted(l0) and l0[0] < l0[-1]
    for name in names:
        sae = load_dictionary(out / name)
        assert sae.config["learner"]["config"]["l1_coeff"] == float(name.split("=")[1])
        assert sae.config["sweep"] == {"param": "l1_coeff", "params": ["l1_coeff"], "label": name,
                                       "values": {"l1_coeff": float(name.split("=")[1])}}
        assert json.loads((out / name / "metrics.json").read_text())["holdout"]["l0"] > 0
    assert (tmp_path / "reports" / "r" / "train" / "tensorboard" / "resid_post.1" / names[0]).is_dir()
    assert "downstream" not in json.loads((out / names[0] / "metrics.json").read_text())


def test_grid_sweep_through_the_stage(tmp_path: Path, store: Path) -> None:
    train = """
    learner: {name: relu_l1, l1_coeff: 0.5, batch_size: 128, lr: 3e-3}
    sweep: {d_sae: [16, 32], seed: [0, 1]}
    hooks: [resid_post.1]
    steps: 20
    log_every: 10
    block_tokens: 256
    """
    proc = run_pipeline(pipeline(tmp_path, store, train))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "reports" / "r" / "train" / "dictionaries" / "resid_post.1"
    names = ["d_sae=16,seed=0", "d_sae=16,seed=1", "d_sae=32,seed=0", "d_sae=32,seed=1"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "sweep.json"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["params"] == ["d_sae", "seed"] and sweep["grid"] == {"d_sae": [16, 32], "seed": [0, 1]}
    assert [m["label"] for m in sweep["members"]] == names and len(sweep["curve"]) == 4
    held = set()
    for name in names:
        sae = load_dictionary(out / name)
        d_sae, seed = (int(part.split("=")[1]) for part in name.split(","))
        assert sae.d_sae == d_sae and sae.config["learner"]["config"]["seed"] == seed
        assert sae.config["sweep"]["values"] == {"d_sae": d_sae, "seed": seed}
        held.add((sae.config["training"]["seed"], tuple(sae.config["training"]["holdout_songs"])))
    assert len(held) == 1  # one hold-out split (the run's seed) for every member
