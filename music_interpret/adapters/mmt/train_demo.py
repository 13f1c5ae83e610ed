"""Train an MMT model in MMT's format (the bundled demo model and larger ones).

See :mod:`.training` for the recipe, the output folder and resuming. Examples::

    python -m music_interpret.adapters.mmt.train_demo data/base/bach_notes models/bach/demo2
    python -m music_interpret.adapters.mmt.train_demo DATA OUT --dim 256 --layers 6 \\
        --heads 4 --attn-dropout 0 --steps 30000 --valid-steps 500 --patience 8

Rerunning the same command continues an interrupted run from ``checkpoints/last.pt``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .training import PRECISIONS, SAVE_DTYPES, TrainOptions, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions(Path("."), Path("."))
    p = argparse.ArgumentParser(
        prog="python -m music_interpret.adapters.mmt.train_demo",
        description="Train an MMT model on CPU or GPU, in MMT's checkpoint format. Rerunning "
                    "the same command continues an interrupted run.")  # fmt: skip
    p.add_argument("data", type=Path, help="note dataset with train/valid split lists")
    p.add_argument("out", type=Path, help="model folder to write (train-args.json, checkpoints/, "
                   "metrics.json); a new or empty folder, or one this command made to continue")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=d.dim)
    g.add_argument("--layers", type=int, default=d.layers)
    g.add_argument("--heads", type=int, default=d.heads, help="attention heads of 64 dimensions")
    g.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=d.max_seq_len)
    g.add_argument("--max-beat", dest="max_beat", type=int, default=d.max_beat)
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="embedding, feed-forward (and attention) dropout, as MMT's --dropout")
    g.add_argument("--attn-dropout", dest="attn_dropout", type=float, default=None,
                   help="dropout on the attention weights (default: --dropout, as MMT); above 0 "
                        "attention leaves the fused SDPA kernel on CPU (2.5-4x slower steps)")
    g.add_argument("--rel-pos-emb", dest="rel_pos_emb", action="store_true",
                   help="rotary positions instead of the learned absolute embedding")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size)
    g.add_argument("--steps", type=int, default=d.steps, help="most optimiser steps")
    g.add_argument("--valid-steps", dest="valid_steps", type=int, default=d.valid_steps,
                   help="evaluate on the validation split every this many steps")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many evaluations in a row without a new best "
                        "validation loss (0: never; MMT's tolerance + 1)")
    g.add_argument("--min-delta", dest="min_delta", type=float, default=d.min_delta,
                   help="nats of validation loss an evaluation must gain over the last one "
                        "that counted to reset --patience (default 0: any new best)")
    g.add_argument("--learning-rate", dest="learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--lr-decay-steps", dest="lr_decay_steps", type=int, default=d.lr_decay_steps,
                   help="step at which the linear decay ends (MMT's meaning)")
    g.add_argument("--lr-decay-multiplier", dest="lr_decay_multiplier", type=float,
                   default=d.lr_decay_multiplier)
    g.add_argument("--grad-norm-clip", dest="grad_norm_clip", type=float, default=d.grad_norm_clip)
    g.add_argument("--no-aug", dest="aug", action="store_false", help="turn augmentation off")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--length-pool", dest="length_pool", type=int, default=d.length_pool,
                   help="batches of songs of similar length, drawn from pools of this many "
                        "shuffled songs (0: random batches as MMT; e.g. 400 pads far less)")
    g = p.add_argument_group("machine and files")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="bf16: autocast with float32 master weights; auto: bf16 where the CPU "
                        "(AMX/AVX512-BF16) or GPU computes it natively, else fp32")
    g.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    g.add_argument("--checkpoint-steps", dest="checkpoint_steps", type=int,
                   default=d.checkpoint_steps,
                   help="also write checkpoints/last.pt every this many steps (it is always "
                        "written at evaluations)")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=0,
                   help="validation batch size (0: --batch-size)")
    g.add_argument("--save-dtype", dest="save_dtype", choices=SAVE_DTYPES, default=d.save_dtype,
                   help="dtype of the parameters in best_model.pt (the adapter loads float32)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point, under the one error guard (:mod:`music_interpret.guard`)."""
    from ...guard import guarded_main

    return guarded_main(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    metrics = train(TrainOptions(**vars(ns)))
    keys = ("valid_loss_per_field", "unigram_baseline_per_field", "bigram_baseline_per_field",
            "bigram_tuned_baseline_per_field", "best_step", "stopped", "tokens_per_second",
            "wall_seconds")  # fmt: skip
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
