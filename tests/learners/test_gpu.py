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
