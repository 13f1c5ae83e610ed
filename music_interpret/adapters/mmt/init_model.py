"""``python -m music_interpret.adapters.mmt.init_model OUT --dim 512 --layers 6 --heads 8``.

Writes an MMT model folder (``train-args.json`` + ``checkpoints/best_model.pt``, MMT's
format) holding a **randomly initialised** model: a stand-in of the paper's size for
measuring throughput (extraction, training, analysis) at scale, where what the model
learned does not matter. Nothing it yields says anything about music. The folder is
written under a temporary name and renamed; an existing folder is never replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ...errors import UserError
from .loading import CHECKPOINT, TRAIN_ARGS, config_from_args


def init_model(out: Path, *, dim: int, layers: int, heads: int, max_seq_len: int, max_beat: int,
               rel_pos_emb: bool = False, seed: int = 0) -> Path:
    """Write the random-init model folder ``out`` (refused if it exists)."""
    import torch

    from .model import MMTModel

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; refusing to replace it (choose another folder)")
    args = {"dataset": "random-init", "batch_size": 0, "aug": False, "max_seq_len": max_seq_len,
            "max_beat": max_beat, "dim": dim, "layers": layers, "heads": heads, "dropout": 0.0,
            "abs_pos_emb": not rel_pos_emb, "rel_pos_emb": rel_pos_emb, "steps": 0,
            "random_init_seed": seed}
    torch.manual_seed(seed)
    model = MMTModel(config_from_args(args))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        (tmp / CHECKPOINT).parent.mkdir(parents=True)
        torch.save(model.state_dict(), tmp / CHECKPOINT)
        (tmp / TRAIN_ARGS).write_text(json.dumps(args, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point, under the one error guard (:mod:`music_interpret.guard`)."""
    from ...guard import guarded_main

    return guarded_main(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m music_interpret.adapters.mmt.init_model",
                                description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=1024)
    p.add_argument("--max-beat", dest="max_beat", type=int, default=256)
    p.add_argument("--rel-pos-emb", dest="rel_pos_emb", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    out = init_model(ns.out, dim=ns.dim, layers=ns.layers, heads=ns.heads,
                     max_seq_len=ns.max_seq_len, max_beat=ns.max_beat,
                     rel_pos_emb=ns.rel_pos_emb, seed=ns.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
