"""Dictionary quality on the demo activations: L0 vs FVU for relu_l1 (ours), the seed preset, topk.

Reads ``data/activations/demo`` (hook ``resid_post.3``; run ``python -m music_interpret
run pipeline.yaml --stages extract,preprocess`` first if it is missing), normalised as
the preprocess stage says. Songs are split as the train stage splits them (10% held out).
Three sweeps, each trained in one pass with :class:`~music_interpret.learners.sweep.SweepTrainer`
(all members see the same batches): ``relu_l1`` default recipe over ``l1_coeff``, the
``seed`` preset over ``l1_coeff`` (on raw activations, as the seed project trained) and ``topk`` over ``k``, d_sae = 4 x d_model (``--expansion``). The default recipe and
topk run at lr 1e-3 (the default recipe's 5e-5 is meant for long runs; this one is short). Every
member is evaluated on the held-out songs (FVU against their mean, L0, dead fraction =
latents that never fire on them).

Verdict: at the L0 values of the seed preset's points that the default recipe's curve
spans, the default recipe's FVU and dead fraction are interpolated (linear in log L0)
and compared. The plot goes to ``bench/results/sae_quality.png``, the numbers to
``bench/results/sae_quality.json``. Run: ``python -m bench sae_quality [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "sae_quality.json"
PLOT = BENCH / "results" / "sae_quality.png"
STORE = ROOT / "data" / "activations" / "demo"

SWEEPS: dict[str, tuple[str, dict[str, Any], str, list[float]]] = {
    # name: (learner, recipe options, swept option, values)
    "relu_l1 default": ("relu_l1", {"preset": "default", "lr": 1e-3}, "l1_coeff", [0.1, 0.3, 1.0, 4.0]),
    "relu_l1 seed": ("relu_l1", {"preset": "seed", "normalization": "none"}, "l1_coeff",
                     [1e-3, 1e-2, 3e-2, 1e-1]),
    "topk": ("topk", {"lr": 1e-3}, "k", [4, 16, 32]),
}


def run_sweep(name: str, args: argparse.Namespace, info: Any, mode: str) -> list[dict[str, Any]]:
    from music_interpret.learners.holdout import holdout_songs
    from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
    from music_interpret.learners.sweep import SweepTrainer, sweep_learners
    from music_interpret.learners.topk import TopKConfig, TopKLearner
    from music_interpret.learners.trainer import TrainSettings
    from music_interpret.loader import ActivationLoader

    kind, options, param, values = SWEEPS[name]
    options = dict(options)
    mode = options.pop("normalization", mode)
    common = {"expansion": args.expansion, "batch_size": args.batch, **options}
    learner: Any = (TopKLearner(TopKConfig(**common, dead_tokens=200_000)) if kind == "topk"
                    else ReluL1Learner(ReluL1Config(**common)))
    members = sweep_learners(learner, {param: values})
    held = holdout_songs(info.songs, 0.1, 0)
    train = [i for i in range(len(info.songs)) if i not in held]
    stats = STORE / "stats" / "stats.nc" if mode != "none" else None

    def loader(songs: list[int], batch: int, **kw: Any) -> ActivationLoader:
        return ActivationLoader(STORE, args.hook, batch, normalization=mode, stats=stats,
                                filters={"song": songs}, **kw)

    evaluation = loader(held, 8192, shuffle=False, prefetch=0)
    held_x = torch.cat(list(evaluation))
    sample = next(iter(loader(train, 32_768, seed=1, prefetch=0)))
    train_loader = loader(train, args.batch, drop_last=True, epochs=None, seed=0)
    settings = TrainSettings(steps=args.steps, log_every=100, checkpoint_every=10**9,
                             dead_window_tokens=200_000)
    t0 = time.perf_counter()
    results = SweepTrainer(members, train_loader, settings, checkpoint=args.tmp / f"{name}.pt",
                           tb_dir=lambda _: None, init_sample=lambda: sample,
                           eval_batches=lambda: [held_x]).run()
    seconds = time.perf_counter() - t0
    rows = []
    for label, r in results.items():
        m = r.metrics
        rows.append({"label": label, "l0": m["l0"], "fvu": m["fvu"], "dead_fraction": m["dead_fraction"],
                     "dense_fraction": m["dense_fraction"]})
        print(f"{name:<16} {label:<16} L0 {m['l0']:8.2f}  FVU {m['fvu']:.4f}  "
              f"dead {100 * m['dead_fraction']:5.1f}%", flush=True)
    print(f"{name}: {len(members)} dictionaries x {args.steps} steps in {seconds:.0f}s", flush=True)
    return sorted(rows, key=lambda row: row["l0"])


def interp(rows: list[dict[str, Any]], key: str, l0: float) -> float | None:
    """``key`` at ``l0`` on the curve ``rows`` (linear in log L0); None outside its range."""
    if not l0 > 0:
        return None
    xs = [math.log(r["l0"]) for r in rows if r["l0"] > 0]
    ys = [r[key] for r in rows if r["l0"] > 0]
    if not xs or not min(xs) <= math.log(l0) <= max(xs):
        return None
    return float(np.interp(math.log(l0), xs, ys))


def compare(ours: list[dict[str, Any]], seed: list[dict[str, Any]]) -> dict[str, Any]:
    points = []
    for r in seed:
        fvu, dead = interp(ours, "fvu", r["l0"]), interp(ours, "dead_fraction", r["l0"])
        if fvu is not None and dead is not None:
            points.append({"l0": r["l0"], "seed_fvu": r["fvu"], "ours_fvu": fvu,
                           "seed_dead": r["dead_fraction"], "ours_dead": dead})
    ok = bool(points) and all(p["ours_fvu"] < p["seed_fvu"] and p["ours_dead"] <= p["seed_dead"]
                              for p in points)
    return {"matched_points": points, "ours_better": ok}


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves.items():
        l0 = [r["l0"] for r in rows]
        a.plot(l0, [r["fvu"] for r in rows], "o-", label=name)
        b.plot(l0, [100 * r["dead_fraction"] for r in rows], "o-", label=name)
    for ax, ylabel in ((a, "FVU (held-out)"), (b, "dead latents (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    a.legend()
    fig.suptitle("demo MMT resid_post.3: L0 vs FVU / dead latents")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from bench.machine import machine
    from music_interpret.stores.netcdf import check_store

    p = argparse.ArgumentParser(prog="python -m bench sae_quality", description=__doc__.split("\n")[0])
    p.add_argument("--hook", default="resid_post.3")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--expansion", type=int, default=4, help="d_sae = expansion x d_model")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest at d_model 128)")
    p.add_argument("--quick", action="store_true", help="a few steps, no result files")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 30
    if not (STORE / "store.json").exists():
        print(f"{STORE} is missing: run `python -m music_interpret run pipeline.yaml --stages "
              "extract,preprocess` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    info = check_store(STORE)
    try:
        mode = json.loads((STORE / "stats" / "normalization.json").read_text())["mode"]
    except (OSError, ValueError, KeyError):
        mode = "none"
    curves: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for name in SWEEPS:
            curves[name] = run_sweep(name, args, info, mode)
    verdict = compare(curves["relu_l1 default"], curves["relu_l1 seed"])
    for pt in verdict["matched_points"]:
        print(f"L0 {pt['l0']:7.2f}: FVU ours {pt['ours_fvu']:.4f} vs seed {pt['seed_fvu']:.4f}; "
              f"dead ours {100 * pt['ours_dead']:.1f}% vs seed {100 * pt['seed_dead']:.1f}%")
    if not verdict["matched_points"]:
        print("verdict: the curves do not overlap in L0; widen the sweeps")
    else:
        print("verdict: at equal L0 our recipe has " + ("lower FVU and no more dead latents than "
              "the seed preset" if verdict["ours_better"] else "NOT lower FVU and fewer dead "
              "latents at every matched L0 than the seed preset"))
    if not args.quick:
        results = {"machine": machine(), "store": str(STORE), "hook": args.hook,
                   "normalization": mode, "d_model": info.d_model, "steps": args.steps,
                   "batch": args.batch, "sweeps": {k: {"learner": v[0], "options": v[1],
                                                       "param": v[2], "values": v[3]}
                                                   for k, v in SWEEPS.items()},
                   "curves": curves, "verdict": verdict}
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(RESULTS, to_jsonable(results))  # temporary name, then rename
        plot(curves, PLOT)
        print(f"results: {RESULTS}, {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
