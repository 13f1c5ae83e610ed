"""Loader throughput per stored dtype, and against another checkout (before/after a change).

Writes synthetic stores (``--tokens`` x ``--d-model``, one hook point, shards of 262,144
tokens) in float32, float16 and bfloat16 with this checkout's writer, and with
``--baseline SRC`` also a float32 store written by the checkout at SRC. Each timing runs
in a fresh subprocess that imports ``music_interpret`` from its checkout and times
``--epochs`` shuffled, memory-mapped epochs of batches of 4096 (token-level shuffle),
after one epoch that pages the maps in; the runs alternate between variants for
``--rounds`` rounds, and the table reports each variant's median tokens/s over its
epochs. Results go to ``bench/results/loader_dtype.json``. Run:
``python -m bench loader_dtype [--baseline /path/to/other/checkout]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
HERE = BENCH.parent
RESULTS = BENCH / "results" / "loader_dtype.json"
HOOK = "resid_post.0"
SHARD = 262_144

WRITE = """
import sys, numpy as np
sys.path.insert(0, {src!r})
from pathlib import Path
from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig
n, d, dtype = {n}, {d}, {dtype!r}
sizes = [min({shard}, n - s) for s in range(0, n, {shard})]
songs = [f"song{{i}}" for i in range(len(sizes))]
extra = {{"dtype": dtype}} if dtype != "float32" else {{}}
w = NetCDFStore(NetCDFStoreConfig(shard_tokens={shard})).create(Path({path!r}), hooks=[{hook!r}],
    d_model=d, songs=songs, sources=songs, attrs={{}}, resume=False, **extra)
rng, start = np.random.default_rng(0), 0
for k, m in enumerate(sizes):
    acts = rng.standard_normal((m, 1, d), dtype=np.float32)
    coords = {{c: np.zeros(m, np.int64) for c in TOKEN_COORDS}}
    coords["song"][:] = k
    w.write_shard(acts, coords, k, k + 1)
w.finish()
"""

TIME = """
import sys, time, json
sys.path.insert(0, {src!r})
import music_interpret
assert music_interpret.__file__.startswith({src!r})
from music_interpret.loader import ActivationLoader
loader = ActivationLoader({path!r}, {hook!r}, 4096, seed=0, epochs=1)
assert loader.mapped
for _ in loader: pass
rates = []
for _ in range({epochs}):
    t0 = time.perf_counter(); n = sum(len(b) for b in loader); rates.append(n / (time.perf_counter() - t0))
print(json.dumps(rates))
"""


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, default=None, help="another checkout's root")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="small store, one round, no result file")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.tokens, ns.rounds, ns.epochs = 1 << 17, 1, 2
    tmp = Path(tempfile.mkdtemp(prefix="mi-loader-dtype-", dir=ns.dir))
    variants: dict[str, tuple[str, Path]] = {
        d: (str(HERE), tmp / d) for d in ("float32", "float16", "bfloat16")}
    if ns.baseline is not None:
        variants["baseline float32"] = (str(ns.baseline.resolve()), tmp / "baseline")
    try:
        for name, (src, path) in variants.items():
            t0 = time.perf_counter()
            _python(WRITE.format(src=src, n=ns.tokens, d=ns.d_model, dtype=name.split()[-1],
                                 shard=SHARD, path=str(path), hook=HOOK))
            print(f"  wrote {name} in {time.perf_counter() - t0:.1f}s", flush=True)
        subprocess.run(["sync"], check=False)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(ns.rounds):
            for name, (src, path) in variants.items():
                rates[name] += json.loads(_python(TIME.format(src=src, path=str(path), hook=HOOK,
                                                              epochs=ns.epochs)))
            print(f"  round {r + 1}/{ns.rounds}", flush=True)
        rows = {name: {"median_tokens_per_s": statistics.median(v), "all": v} for name, v in rates.items()}
        print(f"{'variant':<18} {'median tokens/s':>16}  (n={ns.rounds * ns.epochs} epochs)")
        for name, row in rows.items():
            print(f"{name:<18} {row['median_tokens_per_s']:>16,.0f}")
        if not ns.quick:
            from bench.machine import machine

            out: dict[str, Any] = {"tokens": ns.tokens, "d_model": ns.d_model, "batch": 4096,
                                   "shuffle": "token level", "rows": rows, "machine": machine(),
                                   "baseline": str(ns.baseline) if ns.baseline else None,
                                   "bytes": {n: int(sum(f.stat().st_size for f in p.glob("shard-*.nc")))
                                             for n, (_, p) in variants.items()}}
            RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
