"""Data-parallel training: 2 gloo processes on CPU match one process on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader

from .conftest import HOOKS

STEPS, BATCH = 40, 128


def train(store: Path, out: Path, tb: Path | None) -> dict[str, torch.Tensor]:
    """The same training in every process (the trainer shards batches when distributed)."""
    torch.set_num_threads(1)
    # target_l0: the L1 controller must steer every rank by the global batch's L0
    learner = ReluL1Learner(ReluL1Config(d_sae=32, batch_size=BATCH, lr=3e-3, l1_coeff=0.5,
                                         target_l0=4.0, target_l0_gain=0.1))
    loader = ActivationLoader(store, HOOKS[0], BATCH, drop_last=True, epochs=None, prefetch=0,
                              block_tokens=256)
    sample = next(iter(ActivationLoader(store, HOOKS[0], 1024, seed=1, prefetch=0)))
    trainer = Trainer(learner, loader, TrainSettings(steps=STEPS, log_every=10, checkpoint_every=25),
                      checkpoint=out / "ckpt.pt", tb_dir=tb, init_sample=lambda: sample)
    result = trainer.run()
    weights = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return {**weights, "l1_log_scale": torch.tensor(learner.state_dict()["l1_log_scale"])}


def _worker(rank: int, world: int, store: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=world)
    try:
        weights = train(store, out, out / "tb")
        torch.save(weights, out / f"weights{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path: Path, store: Path) -> None:
    single = train(store, tmp_path / "single", None)
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    mp.spawn(_worker, args=(2, store, ddp), nprocs=2, join=True)
    w0 = torch.load(ddp / "weights0.pt", weights_only=True)
    w1 = torch.load(ddp / "weights1.pt", weights_only=True)
    for key, value in single.items():
        assert torch.equal(w0[key], w1[key]), key  # ranks stay in lockstep
        assert torch.allclose(w0[key], value, atol=1e-5, rtol=1e-4), \
            (key, float((w0[key] - value).abs().max()))
    start = next(iter(single.values()))
    assert not torch.equal(start, torch.zeros_like(start))
    assert (ddp / "ckpt.pt").exists() and torch.load(ddp / "ckpt.pt", weights_only=True)["step"] == 25
    assert any((ddp / "tb").iterdir())  # rank 0 wrote the events


def test_shard_splits_the_global_batch() -> None:
    from music_interpret.learners.distributed import DistInfo, shard

    x = torch.arange(12).reshape(6, 2)
    parts = [shard(x, DistInfo(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert shard(x, DistInfo()) is x
    with pytest.raises(ValueError, match="does not split evenly"):
        shard(x, DistInfo(0, 4))
