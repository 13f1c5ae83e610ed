"""Extraction at scale: the ``extract`` stage against a bare forward and the disk, one run.

MMT at the paper's size (dim 512, 6 layers, 8 heads, random weights: a throughput
stand-in) over ``--copies`` copies of the demo songs (3,070 songs at 10), one hook point,
batches of 64 windows. Measured in the same run, on the same file system:

- ``disk``: sequential write bandwidth (``--disk-mb`` MiB written in 64 MiB pieces, then
  fsync), the ceiling of a store's writes;
- ``plan``: songs read, tokenized and windowed per second with 0, 2, 4, 8 planning
  processes (``extract.plan_workers``), no forward;
- ``bare``: forward passes alone over the stage's own batches (padded and on the device
  beforehand, run by as many forward workers as the stage uses), per model dtype;
- ``stage``: the whole stage in a fresh process (``python -m music_interpret run``), per
  model dtype, stored dtype and planning processes; its tokens/s from the stage's summary.

Goals (issue "The main job on a GPU machine at real scale"): stage / bare >= 0.8, and when
the forward outruns the disk, stored bytes/s >= 0.7 of the disk's bandwidth.

    python -m bench extract_scale [--copies 10] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.extract import DATA, ROOT, replicated_dataset
from bench.machine import machine as machine_info

RESULTS = ROOT / "bench" / "results" / "extract_scale.json"
HOOK = "resid_post.5"
BATCH = 64


def disk_bandwidth(folder: Path, mib: int) -> float:
    """Bytes/s of a sequential write of ``mib`` MiB (64 MiB pieces, fsync included)."""
    piece = os.urandom(1 << 20) * 64
    path = folder / "disk-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(max(1, mib // 64)):
            fh.write(piece)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, mib // 64) * len(piece) / seconds


def _adapter(model: Path, device: str, dtype: str) -> Any:
    from music_interpret.adapters.mmt.adapter import MMTAdapter, MMTAdapterConfig

    adapter = MMTAdapter(MMTAdapterConfig(dtype=dtype))
    adapter.load(model, device=device)
    return adapter


def plan_rate(model: Path, data: Path, workers: int) -> dict[str, float]:
    """Songs and stored tokens per second planned with ``workers`` processes."""
    from music_interpret.config import PluginRef
    from music_interpret.stages.extract_plan import SongPlanner

    adapter = _adapter(model, "cpu", "float32")
    dataset = adapter.open_dataset(data)
    names = list(dataset.names)
    planner = SongPlanner(adapter, dataset, names, notes_only=False, note=adapter.event_vocabulary().note,
                          stride=None, workers=workers,
                          adapter_ref=PluginRef("model_adapter", "mmt", adapter.config),
                          model_path=model, data=(data, None))
    try:
        first = next(planner.plans([0]))  # start the workers (and warm the page cache)
        t0 = time.perf_counter()
        tokens = sum(p.n_tokens for p in planner.plans(range(len(names))))
        seconds = time.perf_counter() - t0
    finally:
        planner.close()
    assert first.n_tokens > 0
    return {"workers": workers, "songs_per_s": len(names) / seconds, "tokens_per_s": tokens / seconds}


def bare_forward(model: Path, data: Path, device: str, dtype: str, shard_tokens: int) -> dict[str, float]:
    """Tokens/s of forward passes alone over the stage's batches, prepared on the device."""
    import torch

    from music_interpret.stages.extract_plan import SongPlanner, shard_batches, take_shard

    adapter = _adapter(model, device, dtype)
    dataset = adapter.open_dataset(data)
    names = list(dataset.names)
    planner = SongPlanner(adapter, dataset, names, notes_only=False,
                          note=adapter.event_vocabulary().note, stride=None)
    songs = planner.plans(range(len(names)))
    batches, tokens = [], 0
    while (plan := take_shard(songs, {"dropped_notes": 0}, shard_tokens=shard_tokens)) is not None:
        for idx in shard_batches(plan, BATCH, 0.1):
            b = adapter.pad([plan.windows[i][2].inputs for i in idx])
            b.codes, b.mask = b.codes.to(device), b.mask.to(device)
            batches.append(b)
        tokens += plan.n_tokens
    from concurrent.futures import ThreadPoolExecutor

    from music_interpret.stages.extract import default_forward_workers

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    adapter.run_with_hooks(batches[0], [HOOK])  # warm-up (kernels, allocator)
    sync()
    # the stage's forward workers: on CPU two threads sharing torch's threads (see ExtractConfig)
    workers, threads = default_forward_workers(device), torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda b: adapter.run_with_hooks(b, [HOOK]), batches))
        sync()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "forward_workers": workers}


def stage(tmp: Path, model: Path, data: Path, device: str, dtype: str, stored: str,
          plan_workers: int, shard_mb: float) -> dict[str, Any]:
    """The extract stage in a fresh process; its summary and wall time."""
    run = f"x-{dtype}-{stored}-p{plan_workers}"
    path = tmp / f"{run}.yaml"
    path.write_text(textwrap.dedent(f"""
        run: {run}
        output_dir: {tmp / 'reports'}
        device: {device}
        stages: [extract]
        model: {{path: {model}, adapter: {{name: mmt, dtype: {dtype}}}}}
        data: {{path: {data}}}
        extract:
          hooks: [{HOOK}]
          batch_size: {BATCH}
          dtype: {stored}
          plan_workers: {plan_workers}
          output: {tmp / 'acts' / run}
          store: {{name: netcdf, shard_mb: {shard_mb}}}
    """))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "music_interpret", "run", str(path)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    summary = json.loads((tmp / "reports" / run / "manifest.json").read_text())["stages"]["extract"]["summary"]
    size = sum(f.stat().st_size for f in (tmp / "acts" / run).glob("shard-*.nc"))
    shutil.rmtree(tmp / "acts" / run)  # gigabytes at scale: keep the disk free for the next run
    return {"model_dtype": dtype, "stored_dtype": stored, "plan_workers": plan_workers,
            "tokens": summary["tokens"], "stage_seconds": summary["seconds"], "wall_seconds": wall,
            "tokens_per_s": summary["tokens_per_second"], "store_bytes": size,
            "bytes_per_s": size / summary["seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench extract_scale", description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--disk-mb", type=int, default=2048)
    p.add_argument("--shard-mb", type=float, default=256.0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="a small CPU-sized run (checks the script)")
    p.add_argument("--out", type=Path, default=RESULTS)
    ns, _ = p.parse_known_args(argv)
    import torch

    from music_interpret.adapters.mmt.init_model import init_model

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ns.quick:
        ns.copies, ns.dim, ns.layers, ns.heads, ns.disk_mb, ns.shard_mb = 1, 128, 6, 4, 256, 16.0
    gpu = device.startswith("cuda")
    workers = [0, 2, 4, 8] if gpu else [0, 2]
    dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    with tempfile.TemporaryDirectory(prefix="bench-xscale-", dir=ROOT / "bench") as d:
        tmp = Path(d)
        model = init_model(tmp / "model", dim=ns.dim, layers=ns.layers, heads=ns.heads,
                           max_seq_len=1024, max_beat=256)
        data = DATA if ns.copies == 1 else replicated_dataset(tmp, 307, ns.copies).parent
        shard_tokens = int(ns.shard_mb * 2**20 / (4 * ns.dim))
        result: dict[str, Any] = {
            "benchmark": "extract_scale", "machine": machine_info(), "device": device,
            "device_name": torch.cuda.get_device_name() if gpu else None,
            "model": {"dim": ns.dim, "layers": ns.layers, "heads": ns.heads, "weights": "random init"},
            "songs": 307 * ns.copies, "hook": HOOK, "batch_size": BATCH,
            "disk_bytes_per_s": disk_bandwidth(tmp, ns.disk_mb),
            "plan": [plan_rate(model, data, w) for w in workers],
            "bare": {dt: bare_forward(model, data, device, dt, shard_tokens) for dt in dtypes},
            "stage": [],
        }
        best_plan = workers[-1] if gpu else 0
        for dt in dtypes:
            for stored in ("float32", "float16"):
                result["stage"].append(stage(tmp, model, data, device, dt, stored, best_plan, ns.shard_mb))
        if gpu:
            result["stage"].append(stage(tmp, model, data, device, "bfloat16", "float16", 0, ns.shard_mb))
    disk = result["disk_bytes_per_s"]
    print(f"device {device} ({result['device_name'] or 'cpu'}); {result['songs']} songs; disk "
          f"{disk / 2**20:,.0f} MiB/s sequential")
    for r in result["plan"]:
        print(f"planning, {r['workers']} processes: {r['tokens_per_s']:>12,.0f} tokens/s")
    for dt, r in result["bare"].items():
        print(f"bare forward {dt:<9}: {r['tokens_per_s']:>12,.0f} tokens/s")
    print(f"{'model':<9} {'stored':<8} {'plan':>4} {'tokens/s':>12} {'/ bare':>7} {'/ disk':>7}")
    for r in result["stage"]:
        if "error" in r:
            print(f"stage failed: {r['error']}")
            continue
        r["ratio_bare"] = r["tokens_per_s"] / result["bare"][r["model_dtype"]]["tokens_per_s"]
        r["ratio_disk"] = r["bytes_per_s"] / disk
        print(f"{r['model_dtype']:<9} {r['stored_dtype']:<8} {r['plan_workers']:>4} "
              f"{r['tokens_per_s']:>12,.0f} {r['ratio_bare']:>7.2f} {r['ratio_disk']:>7.2f}")
    result["goals"] = {"stage_over_bare": 0.8, "stage_over_disk_when_forward_outruns_disk": 0.7}
    if ns.quick:
        result["note"] = "--quick: a small model on CPU, to check the script; not a measurement at scale"
    from music_interpret.jsonio import to_jsonable, write_json_atomic

    write_json_atomic(ns.out, to_jsonable(result))
    print(f"wrote {ns.out}")
    return 1 if any("error" in r for r in result["stage"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
