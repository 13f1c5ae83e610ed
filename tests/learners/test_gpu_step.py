"""The accelerator's sparse training step: the dense step's loss, outputs and gradients.

The step is written for CUDA but is plain PyTorch, so every check runs on CPU too (and on
CUDA when present); the learners are made to take it on CPU by patching ``applies``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from music_interpret.learners import gpu_step as GS
from music_interpret.learners.dictionary import Learner
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.topk import TopKConfig, TopKLearner
from music_interpret.learners.trainer import Trainer, TrainSettings

from .test_sparse_step import D_SAE, OUTPUTS, N, batch, close, model_for, step, with_mode
from .test_sweep import loader, sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def on_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The learners take the accelerator step wherever ``sparse_backward`` asks for a sparse one."""
    monkeypatch.setattr(GS, "applies", lambda mode, model, x: mode != "never")


def dense_codes(codes: torch.Tensor) -> torch.Tensor:
    return codes.to_dense() if codes.is_sparse else codes


def parity(learner: Learner, device: str, bias: float = -0.3, dead: torch.Tensor | None = None,
           rtol: float = 1e-5) -> dict[str, torch.Tensor]:
    """Accelerator step vs dense step on ``device``: outputs and gradients; the sparse outputs."""
    x = batch().to(device)
    dead = None if dead is None else dead.to(device)
    runs = {}
    for mode in ("never", "always"):
        lrn = with_mode(learner, mode)
        runs[mode] = step(lrn, model_for(lrn, bias).to(device), x, dead)
    (dense, g_dense), (sparse, g_sparse) = runs["never"], runs["always"]
    assert sparse["codes"].is_sparse
    assert torch.equal(dense_codes(sparse["codes"]), dense["codes"])
    assert torch.equal(sparse["fired"], (dense["codes"] != 0).sum(0))
    for key in OUTPUTS:
        if key != "codes":
            close(sparse[key], dense[key], rtol)
    for key, grad in g_dense.items():
        close(g_sparse[key], grad, rtol)
    return sparse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["default", "seed"])
@pytest.mark.parametrize("apply", [True, False])
def test_relu_l1_step_matches_dense(on_every_device: None, device: str, preset: str,
                                    apply: bool) -> None:
    learner = ReluL1Learner(ReluL1Config(preset=preset, d_sae=D_SAE, l1_coeff=0.3,
                                         apply_b_dec_to_input=apply))
    out = parity(learner, device)
    assert 0 < out["codes"]._nnz() < 0.5 * N * D_SAE  # a real mixture of active and silent pairs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [0, 5, 100])
def test_topk_step_matches_dense(on_every_device: None, device: str, n_dead: int) -> None:
    learner = TopKLearner(TopKConfig(d_sae=D_SAE, k=6, k_aux=12))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    out = parity(learner, device, bias=0.0, dead=dead)
    assert out["codes"]._nnz() == N * 6
    if n_dead:
        assert float(out["aux"]) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_active_codes(on_every_device: None, device: str) -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3))
    parity(learner, device, bias=-100.0)


def test_dense_fallback_above_the_density_limit(on_every_device: None) -> None:
    """``auto`` decodes densely when too many codes fire (no ``fired``), sparsely otherwise."""
    for bias, sparse in ((3.0, False), (-3.0, True)):
        learner = ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3, sparse_backward="auto"))
        m = model_for(learner, bias)
        out, _ = step(learner, m, batch())
        density = float((dense_codes(out["codes"]) != 0).float().mean())
        assert (density <= GS.GPU_MAX_DENSITY) == sparse
        assert out["codes"].is_sparse == sparse and ("fired" in out) == sparse
        dense, _ = step(with_mode(learner, "never"), model_for(learner, bias), batch())
        close(out["loss"], dense["loss"])


def test_bf16_autocast_close_to_the_dense_step(on_every_device: None) -> None:
    """Under bf16 autocast (CPU here) the sparse step stays within bf16 rounding of the dense one."""
    for learner in (ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3)),
                    TopKLearner(TopKConfig(d_sae=D_SAE, k=6, k_aux=12))):
        x = batch()
        dead = torch.arange(D_SAE) % 4 == 0
        runs = {}
        for mode in ("never", "always"):
            lrn = with_mode(learner, mode)
            m = model_for(lrn, 0.0 if isinstance(lrn, TopKLearner) else -0.3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = lrn.loss(m, x, 3, 10, dead)
            out["loss"].backward()
            runs[mode] = (out, {k: p.grad for k, p in m.named_parameters()})
        (dense, g_dense), (sparse, g_sparse) = runs["never"], runs["always"]
        close(sparse["loss"].float(), dense["loss"].float(), rtol=2e-2)
        close(sparse["recon"].float(), dense["recon"].float(), rtol=2e-2)
        for key, grad in g_dense.items():
            cos = torch.nn.functional.cosine_similarity(g_sparse[key].flatten(), grad.flatten(), dim=0)
            assert float(cos) > 0.999, (type(learner).__name__, key, float(cos))


def test_applies_only_off_the_cpu() -> None:
    big = ReluL1Learner(ReluL1Config(d_sae=1024)).build(64, torch.Generator())
    small = ReluL1Learner(ReluL1Config(d_sae=D_SAE)).build(24, torch.Generator())
    x = torch.zeros(2, 64)
    assert not any(GS.applies(mode, big, x) for mode in ("auto", "always", "never"))
    meta = torch.empty(2, 64, device="meta")  # stands for any accelerator
    assert GS.applies("auto", big, meta) and GS.applies("always", big, meta)
    assert not GS.applies("never", big, meta)
    assert not GS.applies("auto", small, meta) and GS.applies("always", small, meta)


@pytest.mark.parametrize("learner", [
    ReluL1Learner(ReluL1Config(d_sae=48, batch_size=64, lr=3e-3, l1_coeff=0.5)),
    TopKLearner(TopKConfig(d_sae=48, k=4, batch_size=64, lr=3e-3, dead_tokens=640)),
])
def test_training_with_the_step_ends_where_the_dense_one_does(
        on_every_device: None, tmp_path: Path, store: Path, learner: Learner) -> None:
    """Through the trainer (firing tracker, L0, dead latents from ``fired``): 30 steps end
    at the dense step's weights up to float32 rounding."""
    settings = TrainSettings(steps=30, log_every=10, checkpoint_every=10)
    x0 = sample(store)
    weights, dead = {}, {}
    for mode in ("never", "always"):
        lrn = type(learner)(dataclasses.replace(learner.config, sparse_backward=mode))
        trainer = Trainer(lrn, loader(store), settings, checkpoint=tmp_path / f"{mode}.pt",
                          tb_dir=None, init_sample=lambda: x0)
        weights[mode] = trainer.run().model.state_dict()
        dead[mode] = torch.load(tmp_path / f"{mode}.pt", weights_only=True)["since_fired"]
    for key, value in weights["never"].items():
        close(weights["always"][key], value, rtol=1e-4)
    assert torch.equal(dead["always"], dead["never"])
