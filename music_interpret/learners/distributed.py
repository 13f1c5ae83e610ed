"""``torchrun ... -m music_interpret.learners.distributed``: one dictionary trained data-parallel.

Launch one process per device; each runs the same training code on its share of every
global batch (:mod:`music_interpret.learners.ddp`). Example (2 GPUs)::

    torchrun --standalone --nproc_per_node 2 -m music_interpret.learners.distributed \\
        STORE HOOK OUT_DIR --learner relu_l1 --steps 10000 --batch-size 8192 --d-sae 16384
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .ddp import DistInfo, LossModule, all_reduce_, info, init, shard, wrap  # noqa: F401 - re-exported


def main(argv: list[str] | None = None) -> int:
    """Train one dictionary of STORE's HOOK data-parallel; rank 0 writes OUT_DIR."""
    from ..guard import guarded_main

    return guarded_main(_run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="torchrun ... -m music_interpret.learners.distributed")
    p.add_argument("store", type=Path)
    p.add_argument("hook")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--learner", default="relu_l1", choices=("relu_l1", "topk"))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch (all ranks)")
    p.add_argument("--d-sae", type=int, default=None)
    p.add_argument("--l1-coeff", type=float, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu forces gloo on CPU")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    ns = p.parse_args(argv)

    from ..loader import ActivationLoader
    from .io import save_dictionary
    from .sae import ReluL1Config, ReluL1Learner
    from .topk import TopKConfig, TopKLearner
    from .trainer import Trainer, TrainSettings

    d, device = init(ns.device)
    opts: dict[str, Any] = {"batch_size": ns.batch_size, "d_sae": ns.d_sae, "lr": ns.lr}
    if ns.learner == "topk":
        learner: Any = TopKLearner(TopKConfig(**opts, **({"k": ns.k} if ns.k else {})))
    else:
        learner = ReluL1Learner(ReluL1Config(**opts, l1_coeff=ns.l1_coeff))
    loader = ActivationLoader(ns.store, ns.hook, ns.batch_size, seed=ns.seed, drop_last=True,
                              epochs=None, device=device)
    sample_loader = ActivationLoader(ns.store, ns.hook, learner.config.init_sample_tokens,
                                     seed=ns.seed + 1, prefetch=0)
    settings = TrainSettings(steps=ns.steps, log_every=ns.log_every, device=device,
                             checkpoint_every=ns.checkpoint_every, seed=ns.seed, name=ns.hook)
    trainer = Trainer(learner, loader, settings, checkpoint=ns.out_dir / "checkpoint.pt",
                      tb_dir=ns.out_dir / "tensorboard",
                      init_sample=lambda: next(iter(sample_loader)))
    result = trainer.run()
    if d.main:
        raw = result.model.folded(torch.zeros(result.model.d_in), torch.full(
            (result.model.d_in,), result.input_scale))
        save_dictionary(ns.out_dir / "dictionary", raw, {
            "hook_point": ns.hook, "learner": {"name": learner.name},
            "training": {"steps": result.steps, "world_size": d.world, "batch_size": ns.batch_size},
            "data": {"store_path": str(ns.store)}}, {"steps": result.steps, "tokens": result.tokens})
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
