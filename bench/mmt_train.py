"""MMT training throughput on CPU (or GPU): fp32 against bf16 autocast, 1 and 2 threads.

Times :func:`music_interpret.adapters.mmt.training.train_step` (forward, loss over real
targets, backward, gradient clipping, Adam, scheduler: exactly the trainer's step) for
an MMT of dim 256, 6 layers, 4 heads of 64, 1024 positions, dropout 0.1, on full
batches of 8 x 1024 tokens (random valid codes, no padding). The configurations
(precision x threads) take turns, one step each per round, so that the load of other
jobs on a shared machine spreads over all of them; each row is the median over
``--repeats`` rounds after one warm-up step, with the best round and the process CPU
time per step (on a machine shared with other jobs, the CPU time of a one-thread row
shows what the step costs when it has a core to itself). Two more rows time attention dropout 0.1
(MMT's default, which takes SDPA's CPU path off the fused kernel) at one thread.

Run: ``python -m bench mmt_train [--quick]``; results go to ``bench/results/mmt_train.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .machine import machine

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "mmt_train.json"


def _setup(precision: str, attn_dropout: float, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from music_interpret.adapters.mmt import representation as rep
    from music_interpret.adapters.mmt.model import MMTConfig, MMTModel
    from music_interpret.adapters.mmt.train_recipe import lr_factor

    torch.manual_seed(0)
    n_tokens = list(rep.N_TOKENS)
    n_tokens[1] = 257  # max_beat 256
    cfg = MMTConfig(args.dim, args.layers, args.heads, 1024, tuple(n_tokens), dropout=0.1,
                    attn_dropout=attn_dropout)  # fmt: skip
    model = MMTModel(cfg).to(args.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 100, 10_000, 0.1))
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(1, n, (args.batch, args.length), generator=g)
                         for n in n_tokens], dim=-1)  # fmt: skip
    mask = torch.ones(args.batch, args.length, dtype=torch.bool)
    return {"model": model, "opt": opt, "sched": sched, "codes": codes, "mask": mask,
            "precision": precision, "times": [], "cpu": []}  # fmt: skip


def _step(run: dict[str, Any], threads: int) -> tuple[float, float]:
    import torch

    from music_interpret.adapters.mmt.training import train_step

    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    train_step(run["model"], run["opt"], run["sched"], run["codes"], run["mask"],
               run["precision"], 1.0)  # fmt: skip
    if run["model"].net.norm.weight.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _rounds(configs: list[tuple[str, int, float]], repeats: int, args) -> list[dict[str, Any]]:
    runs = {c: _setup(c[0], c[2], args) for c in configs}
    for c in configs:  # warm-up
        _step(runs[c], c[1])
    for r in range(repeats):
        for c in configs:
            dt, cpu = _step(runs[c], c[1])
            runs[c]["times"].append(dt)
            runs[c]["cpu"].append(cpu)
            print(f"  round {r + 1}/{repeats} {c[0]} threads {c[1]} attn_dropout {c[2]}: "
                  f"{dt:.2f} s ({cpu:.2f} s CPU)", flush=True)
    tokens = args.batch * args.length
    rows = []
    for (precision, threads, attn_dropout), run in runs.items():
        med = statistics.median(run["times"])
        rows.append({
            "precision": precision, "threads": threads, "attn_dropout": attn_dropout,
            "seconds_per_step": round(med, 3), "tokens_per_second": round(tokens / med),
            "best_tokens_per_second": round(tokens / min(run["times"])),
            "cpu_seconds_per_step": round(statistics.median(run["cpu"]), 3),
            "times": [round(t, 3) for t in run["times"]],
            "cpu_times": [round(t, 3) for t in run["cpu"]],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    from music_interpret.adapters.mmt.train_recipe import cpu_has_bf16
    from music_interpret.engine import write_json_atomic

    p = argparse.ArgumentParser(prog="python -m bench mmt_train", description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dropout-repeats", type=int, default=2,
                   help="rounds of the attention-dropout rows (0: skip them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small smoke run, no result file")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.repeats, args.dropout_repeats = 128, 1, 1
    host = machine()
    threads_before = torch.get_num_threads()
    configs = [(prec, t, 0.0) for t in args.threads for prec in ("fp32", "bf16")]
    rows = _rounds(configs, args.repeats, args)
    if args.dropout_repeats:
        rows += _rounds([("fp32", 1, 0.1), ("bf16", 1, 0.1)], args.dropout_repeats, args)
    torch.set_num_threads(threads_before)
    print(f"{'precision':<9} {'threads':>7} {'attn drop':>9} {'s/step':>7} {'tokens/s':>9} "
          f"{'best':>7} {'CPU s/step':>10}")
    for r in rows:
        print(f"{r['precision']:<9} {r['threads']:>7} {r['attn_dropout']:>9} "
              f"{r['seconds_per_step']:>7.2f} {r['tokens_per_second']:>9,} "
              f"{r['best_tokens_per_second']:>7,} {r['cpu_seconds_per_step']:>10.2f}")
    results = {
        "machine": host, "loadavg_at_end": os.getloadavg(), "torch": torch.__version__, "device": args.device,
        "cpu_bf16": cpu_has_bf16(), "model": {"dim": args.dim, "layers": args.layers,
        "heads": args.heads, "max_seq_len": 1024, "dropout": 0.1},
        "batch": [args.batch, args.length], "repeats": args.repeats, "rows": rows,
    }  # fmt: skip
    if not args.quick:
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
    return 0
