"""The sparse CPU training step: the dense step's loss, outputs and gradients; deterministic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from music_interpret.learners import sparse_step as SP
from music_interpret.learners.dictionary import Dictionary, Learner
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.topk import TopKConfig, TopKLearner
from music_interpret.learners.trainer import Trainer, TrainSettings

from .test_sweep import Interrupted, loader, sample

D_IN, D_SAE, N = 24, 160, 96
OUTPUTS = ("loss", "mse", "l1", "aux", "codes", "recon")


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to float32 summation order: relative to the largest entry."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def model_for(learner: Learner, bias: float = -0.3, seed: int = 0) -> Dictionary:
    """A built dictionary with a random b_dec and b_enc around ``bias`` (sets the L0)."""
    g = torch.Generator().manual_seed(seed)
    m = learner.build(D_IN, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_dec.copy_(torch.randn(D_IN, generator=g))
        m.b_enc.copy_(torch.randn(m.d_sae, generator=g) * 0.3 + bias)
    return m


def batch(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def step(learner: Learner, m: Dictionary, x: torch.Tensor, dead: torch.Tensor | None = None
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and (hooked) gradients of one loss evaluation."""
    dead = torch.zeros(m.d_sae, dtype=torch.bool) if dead is None else dead
    m.zero_grad(set_to_none=True)
    out = learner.loss(m, x, 3, 10, dead)
    out["loss"].backward()
    learner.before_step(m)
    return ({k: v.detach() for k, v in out.items()},
            {k: p.grad.clone() for k, p in m.named_parameters()})


def with_mode(learner: Learner, mode: str) -> Learner:
    return type(learner)(dataclasses.replace(learner.config, sparse_backward=mode))


def assert_parity(learner: Learner, bias: float = -0.3, dead: torch.Tensor | None = None) -> None:
    x = batch()
    dense = step(with_mode(learner, "never"), model_for(learner, bias), x, dead)
    sparse = step(with_mode(learner, "always"), model_for(learner, bias), x, dead)
    for key in OUTPUTS:
        close(sparse[0][key], dense[0][key])
    assert torch.equal(sparse[0]["codes"], dense[0]["codes"])  # the same encoder forward
    assert torch.equal(sparse[0]["fired"], (dense[0]["codes"] != 0).sum(0))
    assert "fired" not in dense[0]
    for key, grad in dense[1].items():
        close(sparse[1][key], grad)


@pytest.mark.parametrize("preset", ["default", "seed"])
@pytest.mark.parametrize("apply", [True, False])
def test_relu_l1_sparse_step_matches_dense(preset: str, apply: bool) -> None:
    learner = ReluL1Learner(ReluL1Config(preset=preset, d_sae=D_SAE, l1_coeff=0.3,
                                         apply_b_dec_to_input=apply))
    assert_parity(learner)
    m = model_for(learner)
    out, grads = step(with_mode(learner, "always"), m, batch())
    assert 0 < float(SP.ActivePairs.of_codes(out["codes"]).nnz) < 0.5 * N * D_SAE
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("loss_mse", ["sum", "mean"])
def test_unit_decoder_with_parallel_gradient_removed(loss_mse: str) -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3, decoder_norm="unit",
                                         remove_parallel_grad=True, loss_mse=loss_mse))
    assert_parity(learner)
    weights = {}
    for mode in ("never", "always"):
        lrn = with_mode(learner, mode)
        m = model_for(lrn)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for i in range(3):
            step(lrn, m, batch(seed=10 + i))
            opt.step()
            lrn.after_step(m)
        weights[mode] = m.state_dict()
    for key, value in weights["never"].items():
        close(weights["always"][key], value, rtol=1e-4)


def test_no_active_codes() -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3))
    assert_parity(learner, bias=-100.0)
    _, grads = step(with_mode(learner, "always"), model_for(learner, -100.0), batch())
    assert not grads["W_dec"].any() and not grads["b_enc"].any() and grads["b_dec"].any()


@pytest.mark.parametrize("n_dead", [0, 5, 100])
def test_topk_sparse_step_matches_dense(n_dead: int) -> None:
    learner = TopKLearner(TopKConfig(d_sae=D_SAE, k=6, k_aux=12))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    assert_parity(learner, bias=0.0, dead=dead)


def test_auto_uses_the_sparse_step_only_for_sparse_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    inner = SP.relu_l1_terms

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(SP, "relu_l1_terms", spy)
    d_in, d_sae = 64, 1024  # d_in * d_sae >= AUTO_MIN_SIZE
    x = torch.randn(32, d_in, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    for mode, bias, sparse in (("auto", -3.0, True), ("auto", 3.0, False), ("never", -3.0, False),
                               ("always", 3.0, True)):
        learner = ReluL1Learner(ReluL1Config(d_sae=d_sae, sparse_backward=mode))
        m = learner.build(d_in, torch.Generator().manual_seed(0))
        with torch.no_grad():
            m.b_enc.fill_(bias)
        calls.clear()
        out = learner.loss(m, x, 0, 10, dead)
        density = float((out["codes"] != 0).float().mean())
        assert (density <= SP.AUTO_MAX_DENSITY) == (bias < 0)
        assert bool(calls) == sparse, (mode, bias, density)
    small = ReluL1Learner(ReluL1Config(d_sae=D_SAE))  # too small to pay: dense
    assert not SP.sparse_possible("auto", small.build(D_IN, torch.Generator()), x)
    assert SP.sparse_possible("always", small.build(D_IN, torch.Generator()), x)


def test_sparse_step_is_deterministic() -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=D_SAE, l1_coeff=0.3, sparse_backward="always"))
    topk = TopKLearner(TopKConfig(d_sae=D_SAE, k=6, k_aux=12, sparse_backward="always"))
    dead = torch.arange(D_SAE) % 3 == 0
    threads = torch.get_num_threads()
    try:
        for lrn in (learner, topk):
            runs = []
            for n_threads in (1, 2, 2):
                torch.set_num_threads(n_threads)
                runs.append(step(lrn, model_for(lrn, 0.0), batch(n=512), dead))
            for out, grads in runs[1:]:
                assert all(torch.equal(out[k], runs[0][0][k]) for k in OUTPUTS)
                assert all(torch.equal(grads[k], runs[0][1][k]) for k in grads)
    finally:
        torch.set_num_threads(threads)


def test_config_option_is_checked() -> None:
    assert ReluL1Config().sparse_backward == "auto" == TopKConfig().sparse_backward
    with pytest.raises(ValueError, match="sparse_backward"):
        ReluL1Config(sparse_backward="sometimes")  # type: ignore[arg-type]


def test_training_sparse_vs_dense_and_resume(tmp_path: Path, store: Path) -> None:
    """Short runs end close; an interrupted sparse run resumes to bitwise the same weights."""
    settings = TrainSettings(steps=30, log_every=10, checkpoint_every=10)
    x0 = sample(store)
    config = ReluL1Config(d_sae=48, batch_size=64, lr=3e-3, l1_coeff=0.5)
    weights = {}
    for mode in ("never", "always"):
        learner = ReluL1Learner(dataclasses.replace(config, sparse_backward=mode))
        trainer = Trainer(learner, loader(store), settings, checkpoint=tmp_path / f"{mode}.pt",
                          tb_dir=None, init_sample=lambda: x0)
        weights[mode] = trainer.run().model.state_dict()
    for key, value in weights["never"].items():
        close(weights["always"][key], value, rtol=1e-4)
    learner = ReluL1Learner(dataclasses.replace(config, sparse_backward="always"))
    ckpt = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        Trainer(learner, Interrupted(loader(store), 25), settings, checkpoint=ckpt, tb_dir=None,
                init_sample=lambda: x0).run()
    resumed = Trainer(learner, loader(store), settings, checkpoint=ckpt, tb_dir=None,
                      init_sample=lambda: x0).run().model.state_dict()
    assert all(torch.equal(resumed[k], weights["always"][k]) for k in resumed)


@pytest.mark.parametrize("apply", [True, False])
def test_pre_acts_gradients_match_the_plain_formula(apply: bool) -> None:
    """The zero-valued b_dec term of ``pre_acts`` gives the plain formula's values and gradients."""
    g = torch.Generator().manual_seed(3)
    model = Dictionary(24, 96, apply_b_dec_to_input=apply)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(50, 24, generator=g) + 3.0
    weights = torch.randn(50, 96, generator=g)
    (model.pre_acts(x) * weights).sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shifted = x - model.b_dec if apply else x
    plain = shifted @ model.W_enc + model.b_enc
    (plain * weights).sum().backward()
    torch.testing.assert_close(model.pre_acts(x), plain, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in got
            continue
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-4)
    assert ("b_dec" in got) is apply
