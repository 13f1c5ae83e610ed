"""Training end to end: the train stage, its files, TensorBoard, NaN, kill-and-resume, seed command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from music_interpret.errors import UserError
from music_interpret.learners.export import export_saelens
from music_interpret.learners.holdout import holdout_songs
from music_interpret.learners.io import load_dictionary
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader
from music_interpret.stores.netcdf import check_store

from ..conftest import REPO
from .conftest import HOOKS, pipeline

TRAIN = """
learner: {name: relu_l1, d_sae: 32, batch_size: 128, lr: 3e-3, l1_coeff: 0.5}
steps: 150
log_every: 25
checkpoint_every: 50
block_tokens: 256
"""


def run_pipeline(path: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "music_interpret", "run", str(path), *extra],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """The train stage run once through the engine (both hook points); returns its output."""
    tmp = tmp_path_factory.mktemp("run")
    proc = run_pipeline(pipeline(tmp, store, TRAIN + "eval_every: 75\n"))
    assert proc.returncode == 0, proc.stderr
    return tmp / "reports" / "r" / "train"


def raw_tokens(store: Path, hook: str, songs: list[int]) -> torch.Tensor:
    loader = ActivationLoader(store, hook, 10**6, shuffle=False, filters={"song": songs}, prefetch=0)
    return next(iter(loader))


def test_stage_outputs_per_hook(trained: Path, store: Path) -> None:
    info = check_store(store)
    for hook in HOOKS:
        folder = trained / "dictionaries" / hook
        assert {p.name for p in folder.iterdir()} == {"weights.safetensors", "config.json", "metrics.json"}
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["hook_point"] == hook and cfg["d_in"] == 16 and cfg["d_sae"] == 32
        assert cfg["data"]["store_id"] == info.manifest["store_id"]
        assert cfg["learner"]["name"] == "relu_l1" and cfg["learner"]["config"]["l1_coeff"] == 0.5
        assert cfg["training"]["steps"] == 150 and cfg["normalization"]["folded"] is True
        held = holdout_songs(info.songs, 0.1, 0)
        assert cfg["training"]["holdout_songs"] == [info.songs[i] for i in held] and held
        metrics = json.loads((folder / "metrics.json").read_text())["holdout"]
        assert metrics["tokens"] > 0 and 0 <= metrics["fvu"] < 0.5 and metrics["l0"] > 0
        assert set(load_file(folder / "weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert not (trained / "checkpoints").exists() or not any((trained / "checkpoints").rglob("*.pt"))


def test_saved_dictionary_reconstructs_raw_activations(trained: Path, store: Path) -> None:
    info = check_store(store)
    hook = HOOKS[0]
    sae = load_dictionary(trained / "dictionaries" / hook)
    held = holdout_songs(info.songs, 0.1, 0)
    x = raw_tokens(store, hook, held)
    recon = sae(x)
    fvu = ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    metrics = json.loads((trained / "dictionaries" / hook / "metrics.json").read_text())["holdout"]
    assert fvu == pytest.approx(metrics["fvu_raw"], rel=1e-3)  # raw space, no normalisation needed
    assert fvu < 0.5 and x.norm(dim=1).mean() > 5  # raw activations, not rescaled ones
    assert torch.equal(sae.decode(sae.encode(x)), recon)


def test_saelens_export_round_trip(trained: Path, tmp_path: Path) -> None:
    folder = trained / "dictionaries" / HOOKS[1]
    out = export_saelens(folder, tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == 16 and cfg["d_sae"] == 32
    assert cfg["metadata"]["hook_name"] == HOOKS[1] and cfg["dtype"] == "float32"
    assert cfg["metadata"]["input_mean_norm"] > 5  # recorded by the train stage
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    ours, theirs = load_file(folder / "weights.safetensors"), load_file(out / "sae_weights.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and set(theirs) == set(ours)
    # SAELens's standard forward on the exported tensors equals ours
    x = torch.randn(9, 16) * 10
    f = torch.relu((x - theirs["b_dec"]) @ theirs["W_enc"] + theirs["b_enc"])
    assert torch.allclose(f @ theirs["W_dec"] + theirs["b_dec"], load_dictionary(folder)(x), atol=1e-5)


def test_tensorboard_tags(trained: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained / "tensorboard" / HOOKS[0]))
    ea.Reload()
    tags = ea.Tags()
    for tag in ("train/mse", "train/fvu", "train/l0", "train/l1", "train/loss",
                "sparsity/dead_fraction", "sparsity/dense_fraction", "opt/lr", "opt/l1_coeff",
                "opt/grad_norm", "eval/fvu", "eval/l0", "eval/dead_fraction", "eval/dense_fraction"):
        assert tag in tags["scalars"], tag
    assert "sparsity/log10_density" in tags["histograms"]
    assert [e.step for e in ea.Scalars("train/mse")] == [25, 50, 75, 100, 125, 150]
    assert [e.step for e in ea.Scalars("eval/fvu")] == [75, 150]
    mse = [e.value for e in ea.Scalars("train/mse")]
    assert mse[-1] < mse[0]


def test_topk_through_the_stage(tmp_path: Path, store: Path) -> None:
    train = """
    learner: {name: topk, d_sae: 32, k: 4, batch_size: 128, lr: 3e-3, dead_tokens: 2000}
    hooks: [resid_post.1]
    steps: 60
    log_every: 20
    """
    proc = run_pipeline(pipeline(tmp_path, store, train))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "reports" / "r" / "train" / "dictionaries" / "resid_post.1"
    sae = load_dictionary(folder)
    assert sae.k == 4 and sae.config["architecture"] == "topk"
    x = torch.randn(20, 16) * 5
    assert ((sae.encode(x) != 0).sum(-1) <= 4).all()
    assert not (folder.parent / "resid_post.0").exists()


def test_nan_loss_stops_with_the_step(tmp_path: Path, store: Path) -> None:
    class Poisoned:
        """The real loader, with NaN in batch 7."""

        def __init__(self) -> None:
            self.inner = ActivationLoader(store, HOOKS[0], 64, drop_last=True, epochs=None, prefetch=0)
            self.d_model, self.n = self.inner.d_model, 0

        def __iter__(self):  # noqa: ANN204
            for x in self.inner:
                self.n += 1
                yield x * float("nan") if self.n == 7 else x

        def state_dict(self) -> dict:
            return self.inner.state_dict()

    learner = ReluL1Learner(ReluL1Config(d_sae=16, batch_size=64, lr=1e-3))
    ckpt = tmp_path / "ckpt.pt"
    trainer = Trainer(learner, Poisoned(), TrainSettings(steps=20, log_every=1, checkpoint_every=5),
                      checkpoint=ckpt, tb_dir=None, init_sample=lambda: raw_tokens(store, HOOKS[0], [0]))
    with pytest.raises(UserError) as err:
        trainer.run()
    msg = str(err.value)
    assert "\n" not in msg and "NaN/Inf at step 7" in msg and "last good checkpoint: step 5" in msg
    assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_kill_and_resume_gives_identical_weights(tmp_path: Path, store: Path) -> None:
    train = """
    learner: {name: topk, d_sae: 32, k: 4, batch_size: 64, lr: 3e-3, dead_tokens: 1000}
    hooks: [resid_post.0]
    steps: 1500
    log_every: 50
    checkpoint_every: 100
    eval_every: 500
    block_tokens: 256
    """
    once = tmp_path / "once"
    killed = tmp_path / "killed"
    for d in (once, killed):
        d.mkdir()
    assert run_pipeline(pipeline(once, store, train)).returncode == 0
    path = pipeline(killed, store, train)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "music_interpret", "run", str(path)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = killed / "reports" / "r" / "train.partial"
    ckpt = partial / "checkpoints" / "resid_post.0" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and ckpt.exists()
    assert not (killed / "reports" / "r" / "train").exists()
    resumed = run_pipeline(path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at step" in resumed.stderr
    a = load_file(once / "reports" / "r" / "train" / "dictionaries" / "resid_post.0" / "weights.safetensors")
    b = load_file(killed / "reports" / "r" / "train" / "dictionaries" / "resid_post.0" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_command(tmp_path: Path, store: Path) -> None:
    import shutil

    acts = tmp_path / "data" / "activations" / "bach" / "tiny"
    shutil.copytree(store, acts)
    base = [sys.executable, "-m", "music_interpret.train", "series", "exp1", "bach/tiny",
            "--latent-dim", "24", "--root", str(tmp_path), "--steps", "40", "--batch-size", "128",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=300, cwd=REPO)

    bad = cmd(*base, "--input-dim", "768")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--input-dim 768 disagrees" in bad.stderr and "d_model 16" in bad.stderr
    bad = cmd(*base, "--input-dim", "16", "--learner", "nope")
    assert bad.returncode == 2 and "unknown learner 'nope'" in bad.stderr
    bad = cmd(*base, "--input-dim", "16", "--preset", "old")
    assert bad.returncode == 2 and "unknown preset 'old'" in bad.stderr
    ok = cmd(*base, "--input-dim", "16", "--hook", "resid_post.1", "--preset", "seed")
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "reports" / "series" / "exp1"
    assert ok.stdout.strip() == str(out)
    sae = load_dictionary(out / "train" / "dictionaries" / "resid_post.1")
    assert sae.d_sae == 24 and sae.config["learner"]["config"]["preset"] == "seed"
    assert not (out / "train" / "dictionaries" / "resid_post.0").exists()
    other = cmd(*base, "--input-dim", "16", "--l1-coeff", "0.5")
    assert other.returncode == 2 and "already holds a different run" in other.stderr
    assert other.stderr.strip().count("\n") == 0
    forced = cmd(*base, "--input-dim", "16", "--l1-coeff", "0.5", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in (out / "train" / "dictionaries").iterdir()) == list(HOOKS)


def test_topk_dead_window_follows_the_stage(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AuxK's dead window is the stage's dead_window_tokens unless the learner sets its own
    (it used to be a fixed 10M tokens, so AuxK never acted on short runs)."""
    from music_interpret.learners.topk import TopKConfig, TopKLearner

    loader = ActivationLoader(store, HOOKS[0], 64, drop_last=True, epochs=None, prefetch=0)
    sample = raw_tokens(store, HOOKS[0], [0])

    def trainer(cfg: TopKConfig, window: int) -> Trainer:
        return Trainer(TopKLearner(cfg), loader, TrainSettings(steps=4, dead_window_tokens=window),
                       checkpoint=Path("/nonexistent/ckpt.pt"), tb_dir=None, init_sample=lambda: sample)

    assert trainer(TopKConfig(d_sae=32, k=4, batch_size=64), 5000).dead_window() == 5000
    assert trainer(TopKConfig(d_sae=32, k=4, batch_size=64, dead_tokens=700), 5000).dead_window() == 700
    run = trainer(TopKConfig(d_sae=32, k=4, batch_size=64), 10**6)
    run.checkpoint = store.parent / "dead-window-ckpt.pt"
    run.run()
    assert "no latent can count as dead, so AuxK never acts" in capsys.readouterr().err
