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
ours over a complete run against it. With CUDA the benchmark also times ours at d_sae 16384, batch 8192 in bf16
(compiled) and reports it as a fraction of the bf16 matmul limit, and runs SAELens's
``StandardTrainingSAE`` on the same shapes when ``bench/.venv-saelens/bin/python`` exists
(SAELens lives only in that venv; without it, the row says so).

Run: ``python -m bench sae_train [--quick]``; results go to ``bench/results/sae_train.json``.
Exit status 1 when ours is less than 3x faster than the seed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
SAELENS_PY = BENCH / ".venv-saelens" / "bin" / "python"
HOOK = "resid_post.0"
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


def time_ours(store: Path, d_sae: int, batch: int, steps: int, warmup: int, device: str,
              bf16: bool = False, sparse: str = "auto", lr: float | None = None) -> dict[str, Any]:
    from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
    from music_interpret.learners.trainer import Trainer, TrainSettings
    from music_interpret.loader import ActivationLoader

    learner = ReluL1Learner(ReluL1Config(d_sae=d_sae, batch_size=batch, init_sample_tokens=8192,
                                         bf16=bf16, compile=bf16, sparse_backward=sparse, lr=lr))
    loader = ActivationLoader(store, HOOK, batch, drop_last=True, epochs=None, device=device)
    sample = ActivationLoader(store, HOOK, 8192, prefetch=0)
    clock: dict[str, StepClock] = {}

    def progress(**kw: Any) -> StepClock:
        clock["bar"] = StepClock(**kw)
        return clock["bar"]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        Trainer(learner, loader, TrainSettings(steps=warmup + steps, log_every=10,
                                               checkpoint_every=10**9, device=device),
                checkpoint=Path(tmp) / "c.pt", tb_dir=None,
                init_sample=lambda: next(iter(sample)), progress=progress).run()
        total = time.perf_counter() - t0
    times = clock["bar"].times
    third = max(2, steps // 3)
    return {"approach": "ours" if sparse != "never" else "ours-dense", "device": device,
            "d_sae": d_sae, "batch": batch, "dtype": "bf16" if bf16 else "fp32", "steps": steps,
            "sparse_backward": sparse, "lr": learner.config.lr,
            "tok_s": rate(times, warmup, batch), "run_s": total,
            "tok_s_first_third": rate(times[: warmup + third], warmup, batch),
            "tok_s_last_third": rate(times[-third:], 0, batch),
            "l0_log": clock["bar"].l0, "l0_final": clock["bar"].l0[-1][1] if clock["bar"].l0 else None}


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


SAELENS_SCRIPT = r"""
import json, sys, time, torch
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
d_in, d_sae, batch, steps = map(int, sys.argv[1:5])
sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32",
                                                    device="cuda", l1_coefficient=5.0))
opt = torch.optim.Adam(sae.parameters(), lr=5e-5)
x = torch.randn(batch, d_in, device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 5.0},
                                                       dead_neuron_mask=None))
    opt.zero_grad(); out.loss.backward(); opt.step()
for _ in range(5): step()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(steps): step()
torch.cuda.synchronize()
print(json.dumps({"tok_s": batch * steps / (time.perf_counter() - t0)}))
"""


def time_saelens(d_sae: int, batch: int, steps: int) -> dict[str, Any]:
    """SAELens's training step on the same shapes (random in-memory batches), in its own venv."""
    row: dict[str, Any] = {"approach": "saelens", "device": "cuda", "d_sae": d_sae, "batch": batch,
                           "dtype": "bf16-autocast", "steps": steps}
    if not SAELENS_PY.exists():
        return {**row, "tok_s": None, "note": f"skipped: {SAELENS_PY} not found (SAELens is "
                "installed only in the benchmark's own venv)"}
    proc = subprocess.run([str(SAELENS_PY), "-c", SAELENS_SCRIPT, "512", str(d_sae), str(batch),
                           str(steps)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return {**row, "tok_s": None, "note": "failed: " + proc.stderr.strip().splitlines()[-1]}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


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


def _gpu_rows(results: dict[str, Any], store: Path) -> dict[str, Any]:
    """Ours (relu_l1, bf16, d_sae 16384, batch 8192) on CUDA, and SAELens when installed."""
    results["gpu"] = torch.cuda.get_device_name()
    gpu = time_ours(store, 16384, 8192, 50, 10, "cuda", bf16=True)
    peak = peak_bf16()
    gpu["fraction_of_bf16_limit"] = (gpu["tok_s"] * 10 * 512 * 16384 / peak) if peak else None
    results["rows"].append(gpu)
    print(_fmt(gpu), flush=True)
    results["rows"].append(time_saelens(16384, 8192, 50))
    print(_fmt(results["rows"][-1]), flush=True)
    return results


def _fmt(r: dict[str, Any]) -> str:
    tok = f"{r['tok_s']:>12,.0f}" if r.get("tok_s") else f"{'-':>12}"
    extra = r.get("note") or (f"{100 * r['fraction_of_bf16_limit']:.1f}% of bf16 limit"
                              if r.get("fraction_of_bf16_limit") else "")
    return (f"{r['approach']:<8} {r['device']:<5} {r['dtype']:<13} d_sae {r['d_sae']:>6} "
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
    print(f"{'approach':<8} {'dev':<5} {'dtype':<13} {'shape':<26} {'tokens/s':>12}")
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
