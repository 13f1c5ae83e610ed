"""``feature_token`` at scale: streaming label statistics of 4096 latents over millions of tokens.

Builds a synthetic store (default 2,097,152 tokens x 512 dims fp32, one hook point,
songs of 1024 tokens with random notes, about 4 GiB) in a temporary folder, and a random
ReLU dictionary with 4096 latents whose encoder bias makes about 2% of them fire per token
(a trained SAE's density). Then, in a fresh process per size, it runs
:func:`~music_interpret.analyzers.feature_token.feature_token_stats` (both passes,
encoder on the fly, latents and the 512 raw dimensions, every attribute) on the first
1/4, 1/2 and all of the tokens and records wall time, tokens/s and peak RSS. Goal:
peak memory flat in the token count, time linear.

    python -m bench feature_token [--tokens 2097152] [--quick] [--dir DIR] [--keep]

Results: ``bench/results/feature_token.json``.
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

from bench.machine import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "feature_token.json"
HOOK = "resid_post.3"
SONG_TOKENS = 1024

CHILD = """
import json, resource, sys, time, torch
from music_interpret.analyzers.feature_token import FeatureTokenConfig, feature_token_stats
from music_interpret.learners.io import load_dictionary
from music_interpret.stores.netcdf import check_store
store, folder, n, chunk, hook = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
device = sys.argv[7]
torch.set_num_threads(int(sys.argv[5]))
d = load_dictionary(folder, device=device)
t0 = time.perf_counter()
labels, res = feature_token_stats(check_store(store), hook, d.encode, d.d_sae,
                                  FeatureTokenConfig(chunk_tokens=chunk), max_tokens=n, device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
s = time.perf_counter() - t0
gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
print(json.dumps({"tokens": labels.n_tokens, "seconds": s, "labels": len(labels), "peak_gpu_mib": gpu,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "latent_density": float(res["latent"]["density"].mean()),
                  "max_best_score_error": float(__import__("numpy").nanmax(
                      res["latent"]["best_score_error"]))}))
"""


def song_coords(n: int, first_song: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Songs of SONG_TOKENS tokens: sos, 4 instruments, start-of-notes, notes, eos."""
    from music_interpret.stores.netcdf import TOKEN_COORDS

    pos = np.arange(n) % SONG_TOKENS
    c = {k: np.full(n, -1, np.int64) for k in TOKEN_COORDS}
    c["song"] = first_song + np.arange(n) // SONG_TOKENS
    c["song_token"] = c["seq_pos"] = pos
    c["window"][:] = 0
    c["event_type"] = np.select([pos == 0, pos < 5, pos == 5, pos == SONG_TOKENS - 1],
                                [0, 1, 2, 4], 3)
    note = c["event_type"] == 3
    k = int(note.sum())
    c["instrument"] = np.where(c["event_type"] == 1, 24 + pos, -1)
    c["instrument"][note] = rng.integers(25, 29, k)
    c["pitch"][note] = rng.integers(36, 84, k)
    c["beat"][note] = (pos[note] - 6) // 4
    c["position"][note] = rng.choice([0, 3, 6, 9], k)
    c["duration"][note] = rng.choice([3, 6, 12, 24], k)
    return c


def build(folder: Path, n_tokens: int, d_model: int, d_sae: int, shard_tokens: int,
          density: float, seed: int) -> tuple[Path, Path, float]:
    """The synthetic store and the random dictionary; returns (store, dictionary, seconds)."""
    import torch
    from scipy.stats import norm

    from music_interpret.learners.dictionary import Dictionary
    from music_interpret.learners.io import save_dictionary
    from music_interpret.stores.netcdf import NetCDFStore, NetCDFStoreConfig

    rng = np.random.default_rng(seed)
    sizes = [min(shard_tokens, n_tokens - s) for s in range(0, n_tokens, shard_tokens)]
    n_songs = -(-n_tokens // SONG_TOKENS)
    songs = [f"song{i:05d}" for i in range(n_songs)]
    t0 = time.perf_counter()
    writer = NetCDFStore(NetCDFStoreConfig(shard_tokens=shard_tokens)).create(
        folder / "store", hooks=[HOOK], d_model=d_model, songs=songs, sources=songs,
        attrs={"fingerprint": "bench"}, resume=False)
    start = 0
    for n in sizes:
        first = start // SONG_TOKENS
        coords = song_coords(n, first, rng)
        acts = rng.standard_normal((n, 1, d_model), dtype=np.float32)
        writer.write_shard(acts, coords, first, -(-(start + n) // SONG_TOKENS))
        start += n
        print(f"  wrote {start:,}/{n_tokens:,} tokens", end="\r", flush=True)
    writer.finish()
    model = Dictionary(d_model, d_sae, apply_b_dec_to_input=False)
    with torch.no_grad():
        w = torch.randn(d_model, d_sae, generator=torch.Generator().manual_seed(seed))
        model.W_enc.copy_(w / w.norm(dim=0, keepdim=True))  # pre-activations ~ N(0, 1)
        model.b_enc.fill_(-float(norm.isf(density)))
        model.W_dec.copy_(model.W_enc.T)
    folder_dict = save_dictionary(folder / "dict", model, {"hook_point": HOOK})
    return folder / "store", folder_dict, time.perf_counter() - t0


def run_size(store: Path, folder: Path, n: int, chunk: int, threads: int,
             device: str = "cpu") -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(store), str(folder), str(n),
                          str(chunk), str(threads), HOOK, device], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["tok_s"] = row["tokens"] / row["seconds"]
    return row


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'] or [])}, {m['date']}",
             f"Store: {r['tokens']:,} tokens x {r['d_model']} fp32; dictionary {r['d_sae']} "
             f"latents (ReLU, target density {r['density']:.0%}); chunk {r['chunk']} tokens; "
             f"{r['threads']} torch threads; both passes, latents + raw dims, all attributes", "",
             "| tokens | labels | seconds | tokens/s | peak RSS MiB | latent density | "
             "max AUROC error bound |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['tokens']:,} | {row['labels']} | {row['seconds']:.1f} | "
                     f"{row['tok_s']:,.0f} | {row['peak_rss_mib']:.0f} | "
                     f"{row['latent_density']:.3f} | {row['max_best_score_error']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench feature_token", description=__doc__)
    p.add_argument("--tokens", type=int, default=2_097_152)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--shard-tokens", type=int, default=262_144)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--quick", action="store_true", help="65,536 tokens x 1024 latents")
    p.add_argument("--dir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the statistics are computed (cuda: also "
                   "the peak GPU memory)")
    p.add_argument("--out", type=Path, default=None, help=f"result file (default {RESULTS}; "
                   "--quick writes none unless given)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_sae, args.shard_tokens = 65_536, 1024, 16_384
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    need = args.tokens * args.d_model * 4 * 1.1 + 2**28
    if shutil.disk_usage(base).free < need:
        print(f"not enough free space in {base} ({need / 2**30:.1f} GiB needed)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="mi-bench-ft-", dir=base))
    results: dict[str, Any] = {"machine": machine(), "device": args.device, "tokens": args.tokens,
                               "d_model": args.d_model, "d_sae": args.d_sae,
                               "density": args.density, "chunk": args.chunk,
                               "threads": args.threads, "rows": []}
    try:
        store, dictionary, results["build_s"] = build(folder, args.tokens, args.d_model,
                                                      args.d_sae, args.shard_tokens,
                                                      args.density, args.seed)
        print(f"built in {results['build_s']:.0f}s" + " " * 20, flush=True)
        for f in args.fractions:
            row = run_size(store, dictionary, int(args.tokens * f), args.chunk, args.threads,
                           args.device)
            results["rows"].append(row)
            gpu = f", peak GPU {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") else ""
            print(f"  {row['tokens']:,} tokens: {row['seconds']:.0f}s, {row['tok_s']:,.0f} tok/s, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB{gpu}", flush=True)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    rows = results["rows"]
    if len(rows) > 1:
        results["rss_ratio_last_first"] = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        results["time_per_token_ratio_last_first"] = (rows[-1]["seconds"] / rows[-1]["tokens"]) / (
            rows[0]["seconds"] / rows[0]["tokens"])
    print(table(results))
    if not args.quick or args.out:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out or RESULTS, to_jsonable(results))  # temporary name, then rename
    return 0


if __name__ == "__main__":
    sys.exit(main())
