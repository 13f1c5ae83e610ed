"""SAE training throughput, end to end with the loader: ours vs a seed-style training loop.

Builds a synthetic store (default 262,144 tokens x 512 dims, fp32; deleted afterwards)
with the netCDF store writer, plus the same data as one ``.npy`` file, then times
training steps at d_in 512, d_sae 4096, batch 4096 (CPU):

* ``ours``: :class:`music_interpret.learners.trainer.Trainer` with ``relu_l1`` (default
  recipe, lr 1e-3 as the demo pipeline uses for short runs) fed by
  :class:`music_interpret.loader.ActivationLoader`, over one complete training run of
  ``--steps`` steps (L1 warm-up, lr decay and all). Its step cost depends on the codes'
  density: on CPU, once at most 10% of the codes are non-zero, the step after the
  encoder works on the active pairs only (``sparse_backward: auto``), so the row gives
  the whole run's throughput and the L0 the run went through (``l0_log``: every 10
  steps), plus the throughput of its first and last thirds;
* ``ours-dense``: the same trainer with ``sparse_backward: never``, timed over the
  first steps (the dense step costs the same whatever the density);
* ``seed``: the seed project's loop: a per-token ``Dataset`` (one row per
  ``__getitem__`` from a memory-mapped ``.npy``) batched by ``DataLoader(shuffle=True)``,
  an SAE of two ``nn.Linear`` layers, MSE + L1, Adam, decoder renormalised each step and
  ``.item()`` on the loss, L0 and MSE every step.

Tokens/s are measured over the steps after ``--warmup`` warm-up steps (timestamps of the
trainer's progress updates). The seed loop's step is dense and costs the same all
through a run, so its first steps stand for its whole run; the speed-up (goal 3x) is
ours over a complete run against it.

With CUDA (``--gpu-only`` runs only these; issue 17's goals), at d_in 512, d_sae 16384,
batch 8192, fed by the loader from the store: ``relu_l1`` (lr 1e-3, so that the codes get
sparse within the run) and ``topk`` (k 32), each as one complete bf16 run of 600 steps
with the accelerator's sparse step (:mod:`music_interpret.learners.gpu_step`) and as a
float32 dense reference run on the same batches; the bf16 run's tokens/s as a share of
the dense limit (the card's bf16 peak / 10 d_in d_sae FLOP per token) and its FVU, L0 and
dead share on 32,768 tokens of the store against the reference's (goal: within 2%, dead share at
most 0.5 points higher); ``topk`` at d_sae 131072 (peak memory); and SAELens 6.54.12's
training steps on the same shapes, rebuilt in :mod:`bench.saelens_step` (the library's
dependencies do not fit the offline GPU machine; the rebuild is checked against the
library in ``tests/learners/test_saelens_step.py``).

Run: ``python -m bench sae_train [--quick]``; results go to ``bench/results/sae_train.json``.
Exit status 1 when ours is less than 3x faster than the seed loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "sae_train.json"
HOOK = "resid_post.0"
TOPK_K = 32
MIN_SPEEDUP = 3.0
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense TFLOPS


def build(folder: Path, n_tokens: int, d: int, seed: int) -> tuple[Path, Path]:
    """The netCDF store and an .npy copy of the same activations."""
    from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

    rng = np.random.default_rng(seed)
    shard = 65_536
    sizes = [min(shard, n_tokens - s) for s in range(0, n_tokens, shard)]
    songs = [f"song{i}" for i in range(len(sizes))]
    writer = NetCDFStore(NetCDFStoreConfig(shard_tokens=shard)).create(
        folder / "store", hooks=[HOOK], d_model=d, songs=songs, sources=songs,
        attrs={"fingerprint": "bench"}, resume=False)
    dic = rng.standard_normal((2048, d), dtype=np.float32)
    npy = np.lib.format.open_memmap(folder / "acts.npy", "w+", np.float32, (n_tokens, d))
    start = 0
    for k, n in enumerate(sizes):  # sparse combinations of random directions, plus an offset
        idx = rng.integers(0, len(dic), (n, 8))
        acts = (dic[idx] * rng.uniform(0, 2, (n, 8, 1)).astype(np.float32)).sum(1) + 1.0
        coords = {name: np.zeros(n, np.int64) for name in TOKEN_COORDS}
        coords["song"][:] = k
        writer.write_shard(acts[:, None], coords, k, k + 1)
        npy[start : start + n] = acts
        start += n
    writer.finish()
    npy.flush()
    return folder / "store", folder / "acts.npy"


class StepClock:
    """A progress bar stand-in recording the time of every finished step (and the L0 logged)."""

    def __init__(self, **_: Any) -> None:
        self.times: list[float] = []
        self.l0: list[tuple[int, float]] = []

    def update(self, n: int = 1) -> None:
        self.times.append(time.perf_counter())

    def set_postfix(self, **kw: Any) -> None:
        if "l0" in kw:
            self.l0.append((len(self.times), float(kw["l0"])))

    def close(self) -> None:
        pass


def rate(times: list[float], warmup: int, batch: int) -> float:
    steps = len(times) - warmup
    return batch * (steps - 1) / (times[-1] - times[warmup]) if steps > 1 else float("nan")


def make_learner(kind: str, d_sae: int, batch: int, bf16: bool, compile_: bool, sparse: str,
                 lr: float | None) -> Any:
    """``relu_l1`` (default recipe) or ``topk`` (k 32) at these shapes and options."""
    from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
    from music_interpret.learners.topk import TopKConfig, TopKLearner

    opts = {"d_sae": d_sae, "batch_size": batch, "init_sample_tokens": 8192, "bf16": bf16,
            "compile": compile_, "sparse_backward": sparse, "lr": lr}
    return TopKLearner(TopKConfig(k=TOPK_K, **opts)) if kind == "topk" else ReluL1Learner(ReluL1Config(**opts))


@torch.no_grad()
def quality(store: Path, model: Any, scale: float, device: str) -> dict[str, float]:
    """FVU, L0 and dead share (latents silent on all of it) of a trained dictionary on 32,768
    tokens of the store (another seed's draw; the synthetic tokens are independent draws of
    one distribution, so this compares fits, it is not a held-out test), in float32."""
    from music_interpret.learners.metrics import fvu
    from music_interpret.loader import ActivationLoader

    x = next(iter(ActivationLoader(store, HOOK, 32_768, seed=99, prefetch=0))).to(device) * scale
    model = model.float()
    codes = model.activate(model.pre_acts(x))
    return {"fvu": float(fvu(x, model.decode(codes))), "l0": float((codes > 0).sum(-1).float().mean()),
            "dead": float(((codes > 0).sum(0) == 0).float().mean())}


def time_ours(store: Path, d_sae: int, batch: int, steps: int, warmup: int, device: str,
              bf16: bool = False, sparse: str = "auto", lr: float | None = None,
              learner: str = "relu_l1", compile_: bool | None = None,
              evaluate: bool = False) -> dict[str, Any]:
    """One complete training run of ``warmup + steps`` steps through the trainer and loader;
    tokens/s over the steps after ``warmup`` (``compile_`` defaults to ``bf16``)."""
    from music_interpret.learners.trainer import Trainer, TrainSettings
    from music_interpret.loader import ActivationLoader

    compile_ = bf16 if compile_ is None else compile_
    lrn = make_learner(learner, d_sae, batch, bf16, compile_, sparse, lr)
    loader = ActivationLoader(store, HOOK, batch, drop_last=True, epochs=None, device=device)
    sample = ActivationLoader(store, HOOK, 8192, prefetch=0)
    clock: dict[str, StepClock] = {}

    def progress(**kw: Any) -> StepClock:
        clock["bar"] = StepClock(**kw)
        return clock["bar"]

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = Trainer(lrn, loader, TrainSettings(steps=warmup + steps, log_every=10,
                                                    checkpoint_every=10**9, device=device),
                         checkpoint=Path(tmp) / "c.pt", tb_dir=None,
                         init_sample=lambda: next(iter(sample)), progress=progress).run()
        total = time.perf_counter() - t0
    times = clock["bar"].times
    third = max(2, steps // 3)
    name = "ours" if sparse != "never" else "ours-dense"
    row = {"approach": name if learner == "relu_l1" else f"{name}-{learner}", "learner": learner,
           "device": device, "d_sae": d_sae, "batch": batch, "dtype": "bf16" if bf16 else "fp32",
           "compiled": compile_, "steps": steps, "sparse_backward": sparse, "lr": lrn.config.lr,
           "tok_s": rate(times, warmup, batch), "run_s": total,
           "tok_s_first_third": rate(times[: warmup + third], warmup, batch),
           "tok_s_last_third": rate(times[-third:], 0, batch),
           "l0_log": clock["bar"].l0, "l0_final": clock["bar"].l0[-1][1] if clock["bar"].l0 else None}
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if evaluate:
        row["quality"] = quality(store, result.model, result.input_scale, device)
    return row


class TokenDataset(Dataset):
    """Seed style: one token per item from a memory-mapped array."""

    def __init__(self, path: Path) -> None:
        self.acts = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.acts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.acts[i]))


class SeedSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.encoder(x))
        return self.decoder(f), f


def time_seed(npy: Path, d_sae: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    data = DataLoader(TokenDataset(npy), batch_size=batch, shuffle=True, drop_last=True)
    model = SeedSAE(np.load(npy, mmap_mode="r").shape[1], d_sae)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, log = [], []
    t0 = time.perf_counter()
    while len(times) < warmup + steps:
        for x in data:
            recon, f = model(x)
            mse = (recon - x).pow(2).mean()
            loss = mse + 1e-3 * f.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.decoder.weight /= model.decoder.weight.norm(dim=0, keepdim=True)
            log.append((loss.item(), (f > 0).float().sum(-1).mean().item(), mse.item()))
            times.append(time.perf_counter())
            if len(times) == warmup + steps:
                break
    return {"approach": "seed", "device": "cpu", "d_sae": d_sae, "batch": batch, "dtype": "fp32",
            "steps": steps, "tok_s": rate(times, warmup, batch), "run_s": time.perf_counter() - t0}


def time_saelens(arch: str, d_sae: int, batch: int, steps: int, device: str = "cuda"
                 ) -> dict[str, Any]:
    """SAELens 6.54.12's training step (``StandardTrainingSAE`` or ``TopKTrainingSAE`` through
    ``SAETrainer._train_step``, bf16 autocast) rebuilt in :mod:`bench.saelens_step`, on
    random batches already on the device (no loader: an upper bound of its speed)."""
    from bench.saelens_step import SAELENS_VERSION, PeerSAE, PeerTrainer

    cuda = device == "cuda"
    sae = PeerSAE(512, d_sae, arch, k=TOPK_K, l1_coefficient=5.0, device=device)
    trainer = PeerTrainer(sae, lr=5e-5 if arch == "standard" else 2e-4, autocast=cuda)
    xs = torch.randn(4, batch, 512, device=device)
    for i in range(5):
        trainer.step(xs[i % 4])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(xs[i % 4])
    if cuda:
        torch.cuda.synchronize()
    row = {"approach": f"saelens-{arch}", "learner": "relu_l1" if arch == "standard" else "topk",
           "device": device, "d_sae": d_sae, "batch": batch,
           "dtype": "bf16-autocast" if cuda else "fp32", "steps": steps,
           "tok_s": batch * steps / (time.perf_counter() - t0),
           "implementation": f"bench/saelens_step.py: SAELens {SAELENS_VERSION} rebuilt (its "
                             "dependencies do not fit the offline GPU machine); equal losses and "
                             "weights to the library's: tests/learners/test_saelens_step.py"}
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def peak_bf16() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.machine import machine

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    base = Path(tempfile.mkdtemp(prefix="mi-bench-sae-"))
    results: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "tokens": args.tokens, "d_in": 512,
                               "rows": []}
    rows = results["rows"]
    try:
        store, npy = build(base, args.tokens, 512, args.seed)
        if args.gpu_only:
            return _gpu_rows(results, store) if torch.cuda.is_available() else results
        seed = time_seed(npy, args.d_sae, args.batch, args.seed_steps, args.warmup)
        dense = time_ours(store, args.d_sae, args.batch, args.seed_steps, args.warmup, "cpu",
                          sparse="never", lr=args.lr)
        ours = time_ours(store, args.d_sae, args.batch, args.steps, args.warmup, "cpu", lr=args.lr)
        rows += [ours, dense, seed]
        for row in rows:
            print(_fmt(row), flush=True)
        l0 = ", ".join(f"{step}: {value:.0f}" for step, value in ours["l0_log"][:: max(1, len(ours["l0_log"]) // 10)])
        print(f"ours: L0 during the run (step: L0) {l0}; final {ours['l0_final']:.1f}; "
              f"first third {ours['tok_s_first_third']:,.0f} tok/s, last third {ours['tok_s_last_third']:,.0f} tok/s")
        results["cpu_speedup"] = ours["tok_s"] / seed["tok_s"]
        results["cpu_speedup_dense"] = dense["tok_s"] / seed["tok_s"]
        results["cpu_speedup_last_third"] = ours["tok_s_last_third"] / seed["tok_s"]
        if torch.cuda.is_available():
            _gpu_rows(results, store)
        else:
            results["gpu"] = None
            print("no CUDA: GPU rows (ours bf16 at d_sae 16384 vs SAELens) not run")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def _dense_limit(d_sae: int) -> float | None:
    """Tokens/s of the dense step at the card's bf16 peak (10 * d_in * d_sae FLOP per token)."""
    peak = peak_bf16() if torch.cuda.is_available() else None
    return peak / (10 * 512 * d_sae) if peak else None


def _versus(fast: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Quality of a fast run against the float32 dense reference on the same batches: FVU and
    L0 within 2%, dead share at most 0.5 percentage points higher."""
    q, r = fast["quality"], ref["quality"]
    fvu, l0 = q["fvu"] / r["fvu"], q["l0"] / r["l0"] if r["l0"] else float("nan")
    ok = abs(fvu - 1) <= 0.02 and abs(l0 - 1) <= 0.02 and q["dead"] <= r["dead"] + 0.005
    return {"fvu_ratio": fvu, "l0_ratio": l0, "dead_diff": q["dead"] - r["dead"], "ok": ok}


def _gpu_rows(results: dict[str, Any], store: Path, device: str = "cuda", d_sae: int = 16384,
              batch: int = 8192, steps: int = 600, big: int = 131072) -> dict[str, Any]:
    """Issue 17's rows (module doc): relu_l1 (lr 1e-3, so that the codes get sparse within
    the run) and topk, each a complete bf16 run with the accelerator's sparse step against a
    float32 dense reference on the same batches; topk at d_sae ``big``; SAELens's steps.
    (``device``/shapes other than the defaults: the CPU smoke test of this code.)"""
    cuda = device == "cuda"
    results["gpu"] = torch.cuda.get_device_name() if cuda else None
    limit = _dense_limit(d_sae)
    results["dense_limit_tok_s"] = limit
    for learner, lr in (("relu_l1", 1e-3), ("topk", None)):
        kw = {"learner": learner, "lr": lr, "evaluate": True, "compile_": False}
        fast = time_ours(store, d_sae, batch, steps, 10, device, bf16=cuda, sparse="auto", **kw)
        ref = time_ours(store, d_sae, batch, steps, 10, device, bf16=False, sparse="never", **kw)
        fast["fraction_of_dense_limit"] = fast["tok_s"] / limit if limit else None
        fast["versus_fp32"] = _versus(fast, ref)
        results["rows"] += [fast, ref]
        print(_fmt(fast), flush=True)
        print(_fmt(ref), flush=True)
    wide = time_ours(store, big, batch, 20, 5, device, bf16=cuda, learner="topk", compile_=False)
    results["rows"].append(wide)
    print(_fmt(wide), flush=True)
    for arch in ("standard", "topk"):
        results["rows"].append(time_saelens(arch, d_sae, batch, 50, device))
        print(_fmt(results["rows"][-1]), flush=True)
    for learner in ("relu_l1", "topk"):
        ours = next(r for r in results["rows"] if r.get("learner") == learner and "versus_fp32" in r)
        peer = next(r for r in results["rows"] if r["approach"].startswith("saelens")
                    and r["learner"] == learner)
        results.setdefault("goals", {})[learner] = {
            "fraction_of_dense_limit": ours["fraction_of_dense_limit"],
            "versus_saelens": ours["tok_s"] / peer["tok_s"],
            "quality_ok": ours["versus_fp32"]["ok"],
            "met": bool(ours["fraction_of_dense_limit"] and ours["fraction_of_dense_limit"] >= 0.5
                        and ours["tok_s"] >= 2 * peer["tok_s"] and ours["versus_fp32"]["ok"])}
        g = results["goals"][learner]
        share = f"{100 * g['fraction_of_dense_limit']:.0f}%" if g["fraction_of_dense_limit"] else "-"
        print(f"{learner}: {share} of the dense limit (goal 50%), {g['versus_saelens']:.2f}x SAELens "
              f"(goal 2x), quality {'ok' if g['quality_ok'] else 'NOT ok'}: goals "
              f"{'met' if g['met'] else 'NOT met'}", flush=True)
    return results


def _fmt(r: dict[str, Any]) -> str:
    tok = f"{r['tok_s']:>12,.0f}" if r.get("tok_s") else f"{'-':>12}"
    extra = r.get("note") or (f"{100 * r['fraction_of_dense_limit']:.1f}% of the dense limit"
                              if r.get("fraction_of_dense_limit") else "")
    if r.get("quality"):
        extra += " FVU {fvu:.3f} L0 {l0:.1f} dead {dead:.1%}".format(**r["quality"])
    if r.get("peak_gib"):
        extra += f" peak {r['peak_gib']:.1f} GiB"
    return (f"{r['approach']:<15} {r['device']:<5} {r['dtype']:<13} d_sae {r['d_sae']:>6} "
            f"batch {r['batch']:>5} {tok} tok/s  {extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench sae_train", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1000,
                   help="steps of ours' complete training run (1000 x 4096 = 4.1M tokens)")
    p.add_argument("--seed-steps", type=int, default=12,
                   help="timed steps of the seed loop and of ours-dense (after the warm-up)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small smoke run, no result file")
    p.add_argument("--gpu-only", action="store_true", help="only the CUDA rows (bench/gpu_check.sh)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_sae, args.steps, args.seed_steps = 32_768, 1024, 12, 4
    print(f"{'approach':<15} {'dev':<5} {'dtype':<13} {'shape':<26} {'tokens/s':>12}")
    results = run(args)
    if args.gpu_only:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out, to_jsonable(results))
        print(f"results: {args.out}" if results.get("gpu") else "no CUDA: nothing measured")
        return 0 if results.get("gpu") else 1
    speedup = results["cpu_speedup"]
    ok = speedup >= MIN_SPEEDUP
    print(f"CPU speed-up ours / seed over a complete run: {speedup:.2f}x (goal >= {MIN_SPEEDUP}x: "
          f"{'met' if ok else 'NOT met'}); dense step only: {results['cpu_speedup_dense']:.2f}x; "
          f"last third of the run: {results['cpu_speedup_last_third']:.2f}x")
    if not args.quick:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out, to_jsonable(results))  # temporary name, then rename
        print(f"results: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
