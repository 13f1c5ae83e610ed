"""Recipe components of relu_l1 and topk: initialisation, folding, penalties, constraints, presets."""

from __future__ import annotations

import math

import pytest
import torch

from music_interpret.learners.dictionary import Dictionary, geometric_median, lr_factor
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.topk import TopKConfig, TopKLearner, auxk_loss

GEN = torch.Generator().manual_seed(0)


def random_dictionary(d: int = 6, n: int = 10, k: int | None = None, apply: bool = True) -> Dictionary:
    g = torch.Generator().manual_seed(1)
    m = Dictionary(d, n, k=k, apply_b_dec_to_input=apply)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_geometric_median_is_robust_and_matches_known_point() -> None:
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(geometric_median(square), torch.tensor([1.0, 1.0]), atol=1e-5)
    pts = torch.cat([torch.zeros(9, 3), torch.tensor([[1000.0, 0.0, 0.0]])])
    gm = geometric_median(pts, iters=200)
    assert gm.norm() < 1.0 < pts.mean(0).norm()  # the mean is pulled away, the median is not
    x = torch.randn(500, 4, generator=GEN) + 5
    objective = lambda y: (x - y).norm(dim=1).sum()  # noqa: E731
    gm = geometric_median(x, iters=100)
    for delta in torch.eye(4) * 0.01:
        assert objective(gm) <= objective(gm + delta) and objective(gm) <= objective(gm - delta)


@pytest.mark.parametrize("k,apply", [(None, True), (None, False), (3, True)])
def test_folded_dictionary_works_on_raw_activations(k: int | None, apply: bool) -> None:
    m = random_dictionary(k=k, apply=apply)
    shift, scale = torch.randn(6, generator=GEN), torch.rand(6, generator=GEN) + 0.5
    raw = torch.randn(50, 6, generator=GEN) * 3 + 1
    trained = (raw - shift) * scale
    raw_model = m.folded(shift, scale)
    assert torch.allclose(raw_model.encode(raw), m.encode(trained), atol=1e-5)
    assert torch.allclose(raw_model(raw), m(trained) / scale + shift, atol=1e-5)


def test_b_dec_initialisation_options() -> None:
    x = torch.randn(300, 5, generator=GEN) + 3
    for how, expect in (("mean", x.mean(0)), ("geometric_median", geometric_median(x)),
                        ("zeros", torch.zeros(5))):
        learner = ReluL1Learner(ReluL1Config(d_sae=8, b_dec_init=how))
        m = learner.build(5, torch.Generator().manual_seed(0))
        learner.init_b_dec(m, x)
        assert torch.allclose(m.b_dec, expect, atol=1e-5)


def test_default_recipe_loss_weights_l1_by_decoder_norms() -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=10, l1_coeff=2.0, l1_warmup_steps=0))
    m = random_dictionary()
    x = torch.randn(7, 6, generator=GEN)
    out = learner.loss(m, x, 0, 100, torch.zeros(10, dtype=torch.bool))
    f = m.encode(x)
    weighted = (f * m.W_dec.norm(dim=1)).sum(-1).mean()
    sq = (m(x) - x).pow(2).sum(-1).mean()
    assert torch.allclose(out["l1"], weighted) and torch.allclose(out["loss"], sq + 2.0 * weighted)
    assert torch.allclose(out["mse"], (m(x) - x).pow(2).mean())


def test_l1_and_lr_warmup_and_decay() -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=4, l1_coeff=1.0, lr=1.0, lr_warmup_steps=10))
    assert learner.l1_warmup(1000) == 50  # 5% of the steps by default
    assert learner.l1_coeff_at(0, 1000) == pytest.approx(1 / 50)
    assert learner.l1_coeff_at(49, 1000) == 1.0 == learner.l1_coeff_at(500, 1000)
    assert learner.lr_at(0, 1000) == pytest.approx(0.1) and learner.lr_at(9, 1000) == 1.0
    assert learner.lr_at(799, 1000) == 1.0  # linear decay over the last 20%
    assert learner.lr_at(899, 1000) == pytest.approx(0.5) and learner.lr_at(999, 1000) == 0.0
    assert lr_factor(150, 200, 0, "cosine", 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 51 / 100)))
    assert lr_factor(150, 200, 0, "constant", 0.5) == 1.0


def test_unit_decoder_parallel_gradient_removal_keeps_norms() -> None:
    learner = ReluL1Learner(ReluL1Config(d_sae=12, decoder_norm="unit", l1_coeff=0.1))
    m = learner.build(6, torch.Generator().manual_seed(0))
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(12))
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x = torch.randn(64, 6, generator=GEN) * 4
    learner.loss(m, x, 0, 10, torch.zeros(12, dtype=torch.bool))["loss"].backward()
    learner.before_step(m)
    assert (m.W_dec.grad * m.W_dec).sum(1).abs().max() < 1e-5  # gradient orthogonal to rows
    opt.step()  # an orthogonal step changes norms only to second order ...
    assert (m.W_dec.norm(dim=1) - 1).abs().max() < 1e-4
    learner.after_step(m)  # ... and renormalising restores them exactly
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(12), atol=1e-6)


def test_seed_preset_is_the_plain_recipe() -> None:
    c = ReluL1Config(preset="seed", d_sae=400, l1_coeff=0.01)
    assert (c.b_dec_init, c.input_scaling, c.decoder_norm, c.remove_parallel_grad) == \
        ("zeros", "none", "unit", False)
    assert c.l1_warmup_fraction == 0 and c.lr_warmup_steps == 0 and c.lr_decay == "constant"
    assert c.grad_clip == 0 and c.apply_b_dec_to_input is False and c.l1_coeff == 0.01
    learner = ReluL1Learner(c)
    m = learner.build(50, torch.Generator().manual_seed(0))
    assert m.W_enc.std().item() == pytest.approx(0.01, rel=0.05) and abs(m.W_enc.mean().item()) < 1e-3
    assert torch.equal(m.b_enc, torch.full((400,), -1.0)) and not m.b_dec.any()
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(400))
    x = torch.randn(20, 50, generator=GEN) * 10
    out = learner.loss(m, x, 0, 100, torch.zeros(400, dtype=torch.bool))
    f = torch.relu(x @ m.W_enc + m.b_enc)  # b_dec not subtracted
    expect = torch.nn.functional.mse_loss(f @ m.W_dec + m.b_dec, x) + 0.01 * f.abs().sum(-1).mean()
    assert torch.allclose(out["loss"], expect)
    assert learner.l1_coeff_at(0, 100) == 0.01 and learner.lr_at(99, 100) == c.lr
    assert ReluL1Config(preset="seed", b_dec_init="mean").b_dec_init == "mean"  # explicit wins


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="preset"):
        ReluL1Config(preset="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="l1_coeff"):
        ReluL1Config(l1_coeff=-1)
    with pytest.raises(ValueError, match="k .* d_sae"):
        TopKConfig(k=10, d_sae=5)
    with pytest.raises(ValueError, match="lr"):
        TopKConfig(lr=0)


def test_topk_keeps_exactly_k() -> None:
    learner = TopKLearner(TopKConfig(d_sae=40, k=5))
    m = learner.build(8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive
    x = torch.randn(30, 8, generator=GEN)
    f = m.encode(x)
    assert ((f != 0).sum(-1) == 5).all()
    pre = m.pre_acts(x)
    assert torch.equal(f.topk(5).indices.sort().values, pre.topk(5).indices.sort().values)
    with torch.no_grad():
        m.b_enc.fill_(-100.0)  # ReLU after top-k: negative values are dropped
    assert not m.encode(x).any()


def test_auxk_loss_only_with_dead_latents() -> None:
    learner = TopKLearner(TopKConfig(d_sae=40, k=4, k_aux=8))
    m = learner.build(8, torch.Generator().manual_seed(0))
    x = torch.randn(30, 8, generator=GEN) * 3
    none_dead = torch.zeros(40, dtype=torch.bool)
    assert learner.loss(m, x, 0, 10, none_dead)["aux"].item() == 0.0
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:20] = True
    out = learner.loss(m, x, 0, 10, dead)
    assert out["aux"].item() > 0
    out["aux"].backward()
    assert m.W_enc.grad[:, 20:].abs().sum() == 0 and m.W_enc.grad[:, :20].abs().sum() > 0
    pre = m.pre_acts(x).detach()
    residual = (x - m(x)).detach()
    tv = (x - x.mean(0)).pow(2).sum()
    assert torch.allclose(auxk_loss(m, pre, residual, dead, 8, tv), out["aux"].detach())
