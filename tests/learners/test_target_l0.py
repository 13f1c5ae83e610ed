"""relu_l1's target_l0: the L1 coefficient is steered to a requested L0, and resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader

from .conftest import HOOKS
from .test_reliability import Loader


def trainer(store: Path, ckpt: Path, target: float | None, steps: int, hook=None) -> Trainer:  # noqa: ANN001
    torch.manual_seed(0)
    cfg = ReluL1Config(d_sae=64, batch_size=64, lr=3e-3, l1_coeff=0.5, target_l0=target,
                       target_l0_gain=0.05)
    sample = next(iter(ActivationLoader(store, HOOKS[0], 512, shuffle=False, prefetch=0)))
    return Trainer(ReluL1Learner(cfg), Loader(store, hook), TrainSettings(steps=steps, log_every=10,
                   checkpoint_every=20), checkpoint=ckpt, tb_dir=None, init_sample=lambda: sample)


@pytest.mark.parametrize("target", [3.0, 12.0])
def test_l0_reaches_the_target(tmp_path: Path, store: Path, target: float) -> None:
    t = trainer(store, tmp_path / "ckpt.pt", target, 1200)
    result = t.run()
    x = next(iter(ActivationLoader(store, HOOKS[0], 4096, shuffle=False, prefetch=0)))
    with torch.no_grad():
        l0 = float((result.model.encode(x * result.input_scale) > 0).sum(-1).float().mean())
    assert target * 0.7 <= l0 <= target * 1.3, l0
    assert t.learner.state_dict()["l1_log_scale"] != 0.0


def test_the_controller_resumes_exactly(tmp_path: Path, store: Path) -> None:
    reference = trainer(store, tmp_path / "ref.pt", 5.0, 60).run()

    def stop(n: int) -> None:
        if n == 47:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(store, tmp_path / "run.pt", 5.0, 60, stop).run()
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["step"] == 40 and "l1_log_scale" in state["learner_state"]
    resumed = trainer(store, tmp_path / "run.pt", 5.0, 60).run()
    assert torch.equal(resumed.model.W_enc, reference.model.W_enc)


def test_a_short_target_l0_run_is_warned_about(tmp_path: Path, store: Path) -> None:
    """The controller needs about 200 steps to settle (bench sae_equal_l0): the stage says so."""
    from tests.conftest import run_cli

    from .conftest import pipeline

    short = pipeline(tmp_path, store, """
        learner: {name: relu_l1, d_sae: 32, batch_size: 64, lr: 0.003, target_l0: 4}
        steps: 20
        downstream: off
    """)
    result = run_cli("run", str(short))
    assert result.returncode == 0, result.stderr
    assert "target_l0 over 20 steps: the L1 controller needs about 200 steps" in result.stderr


def test_the_goal_falls_geometrically_to_the_target() -> None:
    """The goal starts at the L0 seen at the end of the L1 warm-up and reaches the target
    after ``target_l0_reach`` of the remaining steps; the multiplier moves only off the goal."""
    cfg = ReluL1Config(d_sae=8, target_l0=10.0, target_l0_gain=0.1, target_l0_reach=0.5,
                       l1_warmup_steps=5)
    learner = ReluL1Learner(cfg)
    scale = learner._scale(torch.device("cpu"))
    total = 105  # 100 steps after the warm-up: the goal reaches 10 at step 55
    learner._steer(torch.tensor(1000.0), 4, total)  # still warming up: no start, no move
    assert learner._log_start is None and float(scale) == 0.0
    learner._steer(torch.tensor(1000.0), 5, total)  # the start of the goal: on it
    assert float(scale) == 0.0
    learner._steer(torch.tensor(100.0), 30, total)  # halfway: the goal is sqrt(1000 * 10)
    assert float(scale) == pytest.approx(0.0, abs=1e-6)
    learner._steer(torch.tensor(10.0), 30, total)  # below the goal by log 10: clipped to -1
    assert float(scale) == pytest.approx(-0.1)
    learner._steer(torch.tensor(10.0), 80, total)  # past the reach: the goal is the target
    assert float(scale) == pytest.approx(-0.1)
    assert learner.state_dict()["l1_log_start"] == pytest.approx(float(torch.tensor(1000.0).log()))
    with pytest.raises(ValueError, match="target_l0_reach"):
        ReluL1Config(target_l0=4.0, target_l0_reach=1.5)


@pytest.mark.parametrize(("rest", "span"), [(100, 95.0), (1000, math.log(100) / 0.018), (5000, 1000.0)])
def test_the_default_reach_follows_the_descent_rate(rest: int, span: float) -> None:
    """Without ``target_l0_reach`` the goal falls from 1000 to 10 (log 100) at TARGET_DESCENT
    per step: in 256 steps, unless that is more than 0.95 of the steps after the warm-up
    (then 0.95 of them) or less than 0.2 of them (then 0.2)."""
    from music_interpret.learners.sae import TARGET_DESCENT, TARGET_REACH

    assert (TARGET_DESCENT, TARGET_REACH) == (0.018, (0.2, 0.95))
    learner = ReluL1Learner(ReluL1Config(d_sae=8, target_l0=10.0, l1_warmup_steps=0))
    learner._log_start = torch.tensor(1000.0).log()
    start, target = math.log(1000), math.log(10)
    for step in (0, int(span / 2), int(span) - 1, int(span) + 1, rest):
        done = min(1.0, step / span)
        expected = (1 - done) * start + done * target
        assert float(learner._goal(step, rest, target)) == pytest.approx(expected, rel=1e-5), step


def test_the_controller_climbs_from_below_the_presets_coefficient() -> None:
    """Without l1_coeff, target_l0 starts at TARGET_START times the preset's coefficient; an
    explicit l1_coeff is the start as given, and without target_l0 nothing changes."""
    from music_interpret.learners.sae import PRESETS, TARGET_START

    assert ReluL1Config(target_l0=32.0).l1_coeff == pytest.approx(TARGET_START * 5.0)
    assert ReluL1Config(target_l0=32.0, preset="seed").l1_coeff == pytest.approx(
        TARGET_START * PRESETS["seed"]["l1_coeff"])
    assert ReluL1Config(target_l0=32.0, l1_coeff=3.0).l1_coeff == 3.0
    assert ReluL1Config().l1_coeff == PRESETS["default"]["l1_coeff"]
