"""GPU code paths (bf16 autocast, torch.compile, CUDA loader); skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.topk import TopKConfig, TopKLearner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader

from .conftest import HOOKS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("learner", [
    ReluL1Learner(ReluL1Config(d_sae=64, batch_size=256, lr=1e-3, bf16=True, compile=True)),
    TopKLearner(TopKConfig(d_sae=64, k=8, batch_size=256, bf16=True, compile=True, dead_tokens=500)),
])
def test_bf16_compiled_training_on_cuda(tmp_path: Path, store: Path, learner: object) -> None:
    loader = ActivationLoader(store, HOOKS[0], 256, drop_last=True, epochs=None, device="cuda")
    sample = next(iter(ActivationLoader(store, HOOKS[0], 2048, prefetch=0)))
    trainer = Trainer(learner, loader, TrainSettings(steps=50, log_every=10, checkpoint_every=20,
                                                     device="cuda"),
                      checkpoint=tmp_path / "ckpt.pt", tb_dir=tmp_path / "tb", init_sample=lambda: sample)
    result = trainer.run()
    assert result.model.W_enc.is_cuda and torch.isfinite(result.model.W_dec).all()
    assert (tmp_path / "ckpt.pt").exists()


def test_target_l0_steers_on_cuda(tmp_path: Path, store: Path) -> None:
    """The L1 controller runs on the device (no host sync) and still reaches its target;
    its state leaves the checkpoint as plain floats."""
    torch.manual_seed(0)
    target = 12.0
    learner = ReluL1Learner(ReluL1Config(d_sae=64, batch_size=64, lr=3e-3, l1_coeff=0.5,
                                         target_l0=target))
    loader = ActivationLoader(store, HOOKS[0], 64, drop_last=True, epochs=None, device="cuda")
    sample = next(iter(ActivationLoader(store, HOOKS[0], 512, shuffle=False, prefetch=0)))
    result = Trainer(learner, loader, TrainSettings(steps=1200, log_every=100, checkpoint_every=400,
                                                    device="cuda"),
                     checkpoint=tmp_path / "ckpt.pt", tb_dir=None, init_sample=lambda: sample).run()
    x = next(iter(ActivationLoader(store, HOOKS[0], 4096, shuffle=False, prefetch=0))).cuda()
    with torch.no_grad():
        l0 = float((result.model.encode(x * result.input_scale) > 0).sum(-1).float().mean())
    assert target * 0.7 <= l0 <= target * 1.3, l0
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["learner_state"]
    assert isinstance(state["l1_log_scale"], float) and isinstance(state["l1_log_start"], float)
