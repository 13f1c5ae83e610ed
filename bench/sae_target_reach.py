"""relu_l1's ``target_l0``: when the goal should reach the target, by run length.

On ``bench/sae_equal_l0.py``'s synthetic data (the first 917,504 tokens trained on, the
rest held out; d_sae 4,096, batch 4,096, lr 1e-3, target L0 32), trains ``relu_l1`` for
several run lengths with the goal reaching the target after a fixed share
(``target_l0_reach``) of the steps after the L1 warm-up, and with the default rule (the
goal falls by at most ``TARGET_DESCENT`` log L0 per step, within ``TARGET_REACH`` of the
steps). Reports held-out FVU, L0 and dead share, the log L0 at the end of the warm-up
where the goal starts, and the goal's fall per step.

    python -m bench sae_target_reach [--grid 224:0.85,0.95,auto 900:0.3,auto] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import sae_equal_l0 as E
from bench.machine import machine

RESULTS = Path(__file__).resolve().parent / "results" / "sae_target_reach.json"
GRID = ["224:0.85,0.95,auto", "600:0.95,auto", "900:0.3,0.5,0.95,auto"]


def grid_item(item: str) -> list[tuple[int, float | None]]:
    """``STEPS:REACH,REACH`` (``auto`` = the default rule) as (steps, reach) runs."""
    steps, _, reaches = item.partition(":")
    try:
        runs = [(int(steps), None if r == "auto" else float(r)) for r in reaches.split(",")]
    except ValueError:
        runs = []
    if not runs or any(n < 1 or (r is not None and not 0 <= r <= 1) for n, r in runs):
        raise argparse.ArgumentTypeError(f"{item!r}: expected STEPS:REACH,... with REACH in "
                                         "[0, 1] or auto, e.g. 224:0.95,auto")
    return runs


def fall_per_step(learner: Any, steps: int) -> float:
    """The goal's fall in log L0 per step after the warm-up, read off the learner's own goal."""
    rest = steps - learner.l1_warmup(steps)
    return float(learner._log_start - learner._goal(1, rest, math.log(E.TARGET)))


def main(argv: list[str] | None = None) -> int:
    from music_interpret.jsonio import to_jsonable, write_json_atomic
    from music_interpret.learners.sae import ReluL1Config, ReluL1Learner

    p = argparse.ArgumentParser(prog="python -m bench sae_target_reach", description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", type=grid_item, default=[grid_item(g) for g in GRID],
                   help="STEPS:REACH,... (auto: the default rule)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="65,536 tokens, 12 steps: checks the script")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_tokens = 65_536 * 2 if args.quick else 1_048_576
    runs = [(12, 0.95), (12, None)] if args.quick else [r for item in args.grid for r in item]
    results: dict[str, Any] = {"benchmark": "sae_target_reach", "machine": machine(),
                               "threads": args.threads, "target_l0": E.TARGET, "rows": []}
    print(f"{'steps':>5} {'reach':>6} {'fall/step':>9} {'FVU':>7} {'L0':>6} {'dead':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        acts = E.synthetic(n_tokens, 0)
        n_train = max(65_536, (int(len(acts) * 0.9) // 65_536) * 65_536)
        store = E.write_store(Path(tmp), acts[:n_train])
        held = torch.from_numpy(acts[n_train:] if n_train < len(acts) else acts[-8192:])
        for steps, reach in runs:
            config = ReluL1Config(d_sae=E.D_SAE, batch_size=E.BATCH, lr=E.LR, target_l0=E.TARGET,
                                  target_l0_reach=reach)
            learner = ReluL1Learner(config)
            row = {"steps": steps, "reach": reach, **E.ours(store, held, steps, learner),
                   "log_start": float(learner._log_start),
                   "fall_per_step": fall_per_step(learner, steps)}
            results["rows"].append(row)
            print(f"{steps:>5} {'auto' if reach is None else reach:>6} {row['fall_per_step']:>9.4f} "
                  f"{row['fvu']:>7.4f} {row['l0']:>6.1f} {row['dead']:>6.1%}", flush=True)
    if not args.quick:
        write_json_atomic(args.out, to_jsonable(results))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
