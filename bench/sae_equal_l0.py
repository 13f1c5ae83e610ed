"""Quality at equal sparsity on a short run: relu_l1, topk and a seed-style loop, one pass.

Synthetic activations with a known sparse dictionary, as ``bench/sae_train.py`` builds
them: 2,048 random Gaussian directions in 512 dimensions, each token the sum of 8 of them
(uniform, with repeats) with magnitudes uniform in [0, 2], plus a constant offset of 1.
``--tokens`` (default 1,048,576) are drawn; the first 90%, rounded down to whole shards of
65,536 (917,504 at the default), are trained on in one pass (batch 4,096: 224 steps, a
short run) and the rest is held out. Every trainer gets d_sae 4,096, lr 1e-3 and one
torch thread:

- ``relu_l1`` with ``target_l0`` 32 (the L1 coefficient steered to the requested L0), and
  with fixed ``l1_coeff`` values around it;
- ``topk`` with k 32;
- the seed project's loop (two ``nn.Linear``, ReLU, MSE + l1 * sum |f|, Adam, unit-norm
  decoder columns after each step) over a sweep of l1 coefficients.

Held-out FVU, L0 and the share of latents that never fire on the held-out tokens; the
FVU of each sweep is interpolated to L0 32 (linear in log L0). Goal: ``relu_l1`` at
least matches the seed loop at equal L0.

    python -m bench sae_equal_l0 [--tokens 1048576] [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "sae_equal_l0.json"
HOOK = "resid_post.0"
D, FEATURES, ACTIVE, D_SAE, BATCH, LR, TARGET = 512, 2048, 8, 4096, 4096, 1e-3, 32.0


def synthetic(n: int, seed: int) -> np.ndarray:
    """Tokens that are sparse sums of known directions (see the module doc)."""
    rng = np.random.default_rng(seed)
    dic = rng.standard_normal((FEATURES, D)).astype(np.float32)
    out = np.empty((n, D), np.float32)
    for s in range(0, n, 65_536):
        m = min(65_536, n - s)
        idx = rng.integers(0, FEATURES, (m, ACTIVE))
        out[s: s + m] = (dic[idx] * rng.uniform(0, 2, (m, ACTIVE, 1)).astype(np.float32)).sum(1) + 1.0
    return out


def write_store(folder: Path, acts: np.ndarray) -> Path:
    from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

    shard = 65_536
    starts = list(range(0, len(acts), shard))
    songs = [f"s{k}" for k in range(len(starts))]
    writer = NetCDFStore(NetCDFStoreConfig(shard_tokens=shard)).create(
        folder / "store", hooks=[HOOK], d_model=D, songs=songs, sources=songs,
        attrs={"fingerprint": "bench"}, resume=False)
    for k, s in enumerate(starts):
        part = acts[s: s + shard]
        coords = {name: np.zeros(len(part), np.int64) for name in TOKEN_COORDS}
        coords["song"][:] = k
        writer.write_shard(part[:, None], coords, k, k + 1)
    writer.finish()
    return folder / "store"


def evaluate(encode_decode: Any, held: torch.Tensor) -> dict[str, float]:
    """Held-out FVU, L0 and the share of latents that never fire."""
    sse, fired, l0 = 0.0, None, 0.0
    with torch.no_grad():
        for x in held.split(8192):
            f, recon = encode_decode(x)
            sse += float((recon - x).double().pow(2).sum())
            l0 += float((f > 0).sum())
            hit = (f > 0).any(0)
            fired = hit if fired is None else fired | hit
    total = float((held.double() - held.double().mean(0)).pow(2).sum())
    return {"fvu": sse / total, "l0": l0 / len(held), "dead": 1.0 - float(fired.float().mean())}


def ours(store: Path, held: torch.Tensor, steps: int, learner: Any) -> dict[str, Any]:
    from music_interpret.learners.trainer import Trainer, TrainSettings
    from music_interpret.loader import ActivationLoader

    loader = ActivationLoader(store, HOOK, BATCH, drop_last=True, epochs=None)
    sample = ActivationLoader(store, HOOK, 8192, prefetch=0, seed=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = Trainer(learner, loader, TrainSettings(steps=steps, log_every=steps,
                                                        checkpoint_every=10**9,
                                                        dead_window_tokens=BATCH * steps // 4),
                         checkpoint=Path(tmp) / "c.pt", tb_dir=None,
                         init_sample=lambda: next(iter(sample))).run()
    seconds = time.perf_counter() - t0
    raw = result.model.folded(torch.zeros(D), torch.full((D,), result.input_scale))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, f, recon = raw.run(x)
        return f, recon

    return {**evaluate(run, held), "seconds": seconds}


def seed_loop(train: torch.Tensor, held: torch.Tensor, l1: float, seed: int) -> dict[str, Any]:
    from torch import nn

    torch.manual_seed(seed)
    enc, dec = nn.Linear(D, D_SAE), nn.Linear(D_SAE, D)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    for b in range(0, len(train) - BATCH + 1, BATCH):
        x = train[order[b: b + BATCH]]
        f = torch.relu(enc(x))
        loss = (dec(f) - x).pow(2).mean() + l1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            dec.weight /= dec.weight.norm(dim=0, keepdim=True)
    seconds = time.perf_counter() - t0

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(enc(x))
        return f, dec(f)

    return {**evaluate(run, held), "seconds": seconds, "l1": l1}


def at_l0(rows: list[dict[str, Any]], l0: float = TARGET) -> float | None:
    """FVU interpolated to ``l0`` (linear in log L0) between the rows that bracket it."""
    pts = sorted((r["l0"], r["fvu"]) for r in rows if r["l0"] > 0)
    for (a, fa), (b, fb) in zip(pts, pts[1:], strict=False):
        if a <= l0 <= b:
            t = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a)) if b > a else 0.0
            return fa + t * (fb - fa)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench sae_equal_l0", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l1", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="relu_l1 l1_coeff sweep")
    p.add_argument("--seed-l1", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                   help="the seed loop's l1 sweep")
    p.add_argument("--quick", action="store_true", help="65,536 tokens, to check the script")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
    from music_interpret.learners.topk import TopKConfig, TopKLearner

    n = 65_536 if args.quick else args.tokens
    acts = synthetic(n, args.seed)
    cut = int(n * 0.9) // 65_536 * 65_536 or int(n * 0.9)
    train, held = torch.from_numpy(acts[:cut]), torch.from_numpy(acts[cut:])
    steps = cut // BATCH
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-l0-") as d:
        store = write_store(Path(d), acts[:cut])
        common = {"d_sae": D_SAE, "batch_size": BATCH, "lr": LR, "init_sample_tokens": 8192}
        runs = [("relu_l1", {"target_l0": TARGET}, ReluL1Learner(ReluL1Config(**common, target_l0=TARGET)))]
        runs += [("relu_l1", {"l1_coeff": c}, ReluL1Learner(ReluL1Config(**common, l1_coeff=c))) for c in args.l1]
        runs.append(("topk", {"k": 32}, TopKLearner(TopKConfig(**common, k=32))))
        for name, opts, learner in runs:
            rows.append({"trainer": name, **opts, **ours(store, held, steps, learner)})
            print(f"{name:<8} {opts!s:<22} FVU {rows[-1]['fvu']:.3f}  L0 {rows[-1]['l0']:6.1f}  "
                  f"dead {rows[-1]['dead']:.1%}  {rows[-1]['seconds']:.0f}s", flush=True)
    for l1 in args.seed_l1:
        rows.append({"trainer": "seed", **seed_loop(train, held, l1, args.seed)})
        print(f"seed     {{'l1': {l1}}}{'':<11} FVU {rows[-1]['fvu']:.3f}  L0 {rows[-1]['l0']:6.1f}  "
              f"dead {rows[-1]['dead']:.1%}  {rows[-1]['seconds']:.0f}s", flush=True)
    sweep = [r for r in rows if r["trainer"] == "relu_l1" and "l1_coeff" in r]
    seed = [r for r in rows if r["trainer"] == "seed"]
    result = {"benchmark": "sae_equal_l0", "machine": machine(), "tokens": n, "train_tokens": cut,
              "steps": steps, "d_sae": D_SAE, "batch": BATCH, "lr": LR, "threads": 1, "rows": rows,
              "fvu_at_l0_32": {"relu_l1_sweep": at_l0(sweep), "seed": at_l0(seed)}}
    print(f"FVU at L0 {TARGET:g}: relu_l1 sweep {result['fvu_at_l0_32']['relu_l1_sweep']}, "
          f"seed loop {result['fvu_at_l0_32']['seed']}")
    if not args.quick:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out, to_jsonable(result))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
