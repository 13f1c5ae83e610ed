"""Training-loader throughput: ``ActivationLoader`` vs the seed project's per-token Dataset.

Builds a synthetic store (default 2,097,152 tokens x 512 dims, fp32, one hook point,
shards of 262,144 tokens: about 4 GiB) with the netCDF store writer, and the same data
as ``.npy`` shards (another 4 GiB), in a temporary folder that is deleted afterwards
(``--dir`` chooses where; free space is checked first). Then it times shuffled batches
of 4096 tokens:

* ``ours``: :class:`music_interpret.loader.ActivationLoader` (block shuffling; the store's
  shards memory-mapped and each batch gathered from them, in the consumer's thread on
  CPU), whole epochs timed separately: the first pages the memory maps in, the next
  ``--paired`` (5) find them mapped (the steady state a training run sees). Each of
  those is paired with one more seed round timed just before it, and the speed-up is
  the median of the paired ratios (the machine's speed drifts; neighbouring timings
  share it). Also with ``unit_mean_norm`` normalisation applied on the fly (statistics from
  :func:`compute_stats`, whose time is reported too) unless ``--skip-normalized``; and
  with ``shuffle_run=--shuffle-run`` (16: batches of shuffled runs of 16 neighbouring
  tokens rather than of single tokens, a faster but coarser shuffle, reported apart);
* ``seed``: the older seed project's approach, a map-style ``torch.utils.data.Dataset``
  returning ONE token per ``__getitem__`` from memory-mapped ``.npy`` shards, batched by
  ``DataLoader(shuffle=True, batch_size=4096)`` (``num_workers=0``). Its memory maps are
  paged in first (every page touched once, as ours are after the first epoch; cold maps
  would make it about 1.5x slower). It is slow, so it is timed over 5 rounds of
  ``--seed-batches`` batches (after one warm-up batch), and the median round's
  tokens/s is extrapolated;
* ``raw gather``: the bound on any token-level shuffle from this store on this machine,
  bare ``index_select`` calls of uniformly random rows into a reused batch (see
  :func:`time_raw_gathers`), from the store's mapping and from a copy in anonymous
  huge-page memory. ``fraction_of_raw_gather`` in the results is ours against the first.

Both loaders read from a warm page cache (the data were just written, then flushed with
``sync``), so the comparison is of the loading path, not of the disk. The table gives each row's CPU use (process CPU time
/ wall time): on a shared machine, other processes' load shows there. Run:
``python -m bench loader [--quick]``; results go to ``bench/results/loader.json``. Exit
status 1 when ours (the median paired ratio) is less than 20x faster.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.machine import machine

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "loader.json"
HOOK = "resid_post.0"
MIN_SPEEDUP = 20.0  # issue requirement: ours vs the seed loader, shuffled fp32 batches
SEED_ROUNDS = 5  # timed rounds of --seed-batches batches each (median tokens/s)


# --------------------------------------------------------------------------- data


def build(folder: Path, n_tokens: int, d_model: int, shard_tokens: int, seed: int) -> dict[str, Any]:
    """Write the netCDF store and the .npy shards (same data: dim 0 = token index)."""
    from music_interpret.stores.netcdf import TOKEN_COORDS, NetCDFStore, NetCDFStoreConfig

    store, npy = folder / "store", folder / "npy"
    npy.mkdir(parents=True)
    sizes = [min(shard_tokens, n_tokens - s) for s in range(0, n_tokens, shard_tokens)]
    songs = [f"song{i}" for i in range(len(sizes))]
    writer = NetCDFStore(NetCDFStoreConfig(shard_tokens=shard_tokens)).create(
        store, hooks=[HOOK], d_model=d_model, songs=songs, sources=songs,
        attrs={"fingerprint": "bench"}, resume=False)
    rng = np.random.default_rng(seed)
    t0, start = time.perf_counter(), 0
    for k, n in enumerate(sizes):
        acts = rng.standard_normal((n, 1, d_model), dtype=np.float32)
        acts[:, 0, 0] = np.arange(start, start + n)
        coords = {name: np.zeros(n, np.int64) for name in TOKEN_COORDS}
        coords["song"][:] = k
        coords["event_type"][:] = 3
        writer.write_shard(acts, coords, k, k + 1)
        np.save(npy / f"shard-{k:05d}.npy", acts[:, 0])
        start += n
        print(f"  wrote shard {k + 1}/{len(sizes)}", end="\r", flush=True)
    writer.finish()
    seconds = time.perf_counter() - t0
    print(f"  wrote {n_tokens:,} tokens x {d_model} twice in {seconds:.1f}s" + " " * 10)
    return {"store": store, "npy": sorted(npy.glob("*.npy")), "build_s": seconds}


class SeedTokenDataset(Dataset):
    """The seed project's approach: one token per ``__getitem__`` from memory-mapped .npy."""

    def __init__(self, files: list[Path]) -> None:
        self.arrays = [np.load(f, mmap_mode="r") for f in files]
        self.starts = list(np.cumsum([0] + [len(a) for a in self.arrays[:-1]]))
        self.n = sum(len(a) for a in self.arrays)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        k = bisect.bisect_right(self.starts, index) - 1
        return torch.from_numpy(np.array(self.arrays[k][index - self.starts[k]]))


# --------------------------------------------------------------------------- timing


def time_seed(files: list[Path], batch: int, n_batches: int, seed: int
              ) -> tuple[dict[str, Any], Callable[[], float]]:
    """The seed loader with its memory maps already paged in (as ours after its first epoch).

    Returns its row and a function that times one more round (tokens/s).
    """
    torch.manual_seed(seed)
    dataset = SeedTokenDataset(files)
    for array in dataset.arrays:  # touch every page once: no page faults while timing
        for start in range(0, len(array), 65_536):
            array[start : start + 65_536].max()
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    it = iter(loader)
    first = next(it)  # warm-up (sampler set-up)
    assert first.shape == (batch, first.shape[1])

    def one_round() -> float:
        t0 = time.perf_counter()
        rows = sum(len(next(it)) for _ in range(n_batches))
        return rows / (time.perf_counter() - t0)

    # several short rounds: its rate is the median, robust to a passing hiccup
    t_all, c0 = time.perf_counter(), time.process_time()
    rounds = [one_round() for _ in range(SEED_ROUNDS)]
    seconds = time.perf_counter() - t_all
    row = {"approach": "seed", "normalization": "none", "batches": n_batches * SEED_ROUNDS,
           "tokens": n_batches * batch * SEED_ROUNDS, "seconds": seconds,
           "tok_s": float(np.median(rounds)), "tok_s_rounds": rounds, "extrapolated": True,
           "cpu_percent": 100 * (time.process_time() - c0) / seconds}
    return row, one_round


def time_ours(store: Path, batch: int, normalization: str, stats: Any, epochs: int, prefetch: int | None,
              seed: int, block_tokens: int, buffer_blocks: int, shuffle_run: int = 1,
              seed_round: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """One row per epoch: the first pages the maps in, later ones find them mapped.

    ``seed_round``: timed (untimed for ours) just before each later epoch, so that
    the two rates come from the same moment of a machine whose speed drifts.
    """
    from music_interpret.loader import ActivationLoader

    loader = ActivationLoader(store, HOOK, batch, seed=seed, normalization=normalization,
                              stats=stats, prefetch=prefetch, block_tokens=block_tokens,
                              buffer_blocks=buffer_blocks, shuffle_run=shuffle_run)
    rows = []
    for epoch in range(epochs):
        paired = seed_round() if seed_round is not None and epoch > 0 else None
        seen = np.zeros(loader.n_tokens, bool)
        t0, c0 = time.perf_counter(), time.process_time()
        n, first_batch_s = 0, None
        for b in loader:
            n += len(b)
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
            if normalization == "none":
                seen[b[:, 0].numpy().astype(np.int64)] = True
        seconds = time.perf_counter() - t0
        if normalization == "none" and not seen.all():
            raise SystemExit("ours: an epoch did not deliver every token")
        rows.append({"approach": "ours", "normalization": normalization, "epoch": epoch,
                     "batches": len(loader), "tokens": n, "seconds": seconds, "tok_s": n / seconds,
                     "cpu_percent": 100 * (time.process_time() - c0) / seconds,
                     "first_batch_s": first_batch_s, "extrapolated": False, "prefetch": loader.prefetch,
                     "mapped": loader.mapped,
                     "block_tokens": block_tokens, "buffer_blocks": buffer_blocks,
                     "shuffle_run": shuffle_run,
                     **({"paired_seed_tok_s": paired} if paired is not None else {})})
    loader.close()
    return rows


def time_raw_gathers(store: Path, batch: int, n_batches: int, seed: int) -> list[dict[str, Any]]:
    """The bound on token-level shuffling: bare gathers of ``batch`` uniformly random rows.

    One ``torch.index_select`` per batch into a reused tensor, indices drawn beforehand,
    nothing else: from the loader's own mapping of the store (page cache), and from a
    copy in anonymous memory with transparent huge pages (where the OS allows them).
    Each rate is the median of 3 rounds of ``n_batches`` batches.
    """
    import mmap

    from music_interpret.loader import ActivationLoader

    loader = ActivationLoader(store, HOOK, batch, seed=seed)
    joined, first = loader._rows_space()
    if joined is None:
        return []
    sizes = [s["tokens"] for s in loader.info.manifest["shards"]]
    valid = np.concatenate([f + np.arange(n) for f, n in zip(first, sizes, strict=True)])
    rng = np.random.default_rng(seed)
    picks = [torch.from_numpy(valid[rng.integers(0, len(valid), batch)]) for _ in range(n_batches)]
    out = torch.empty(batch, joined.shape[1])

    def rate(source: torch.Tensor) -> float:
        rounds = []
        for _ in range(3):
            t0 = time.perf_counter()
            for idx in picks:
                torch.index_select(source, 0, idx, out=out)
            rounds.append(batch * n_batches / (time.perf_counter() - t0))
        return float(np.median(rounds))

    rows = [{"approach": "raw gather", "source": "store mapping", "tok_s": rate(joined)}]
    anon = mmap.mmap(-1, joined.numel() * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    huge = hasattr(mmap, "MADV_HUGEPAGE")
    if huge:
        anon.madvise(mmap.MADV_HUGEPAGE)
    copy = torch.frombuffer(anon, dtype=torch.float32).view(joined.shape)
    for f, n in zip(first, sizes, strict=True):  # each shard's rows (the gaps are unmapped)
        for start in range(f, f + n, 65_536):
            stop = min(start + 65_536, f + n)
            copy[start:stop] = joined[start:stop]
    rows.append({"approach": "raw gather", "tok_s": rate(copy),
                 "source": "anonymous memory" + (", huge pages" if huge else "")})
    del copy
    anon.close()
    loader.close()
    for row in rows:
        row.update(normalization="none", batches=3 * n_batches, tokens=3 * n_batches * batch,
                   extrapolated=False)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the data, time both loaders, clean up; returns the results."""
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 2 * args.tokens * args.d_model * 4 * 1.05 + 2**28
    free = shutil.disk_usage(base).free
    print(f"disk: {free / 2**30:.1f} GiB free in {base}, need {need / 2**30:.1f} GiB")
    if free < need:
        raise SystemExit(f"not enough free space in {base} (use --dir or --tokens)")
    folder = Path(tempfile.mkdtemp(prefix="mi-bench-loader-", dir=base))
    results: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "tokens": args.tokens,
                               "d_model": args.d_model, "batch": args.batch,
                               "data_gib": args.tokens * args.d_model * 4 / 2**30, "rows": []}
    try:
        data = build(folder, args.tokens, args.d_model, args.shard_tokens, args.seed)
        results["build_s"] = data["build_s"]
        os.sync()  # flush the freshly written files: no disk write-back while timing
        rows = results["rows"]
        kw = dict(epochs=args.epochs, prefetch=args.prefetch, seed=args.seed,
                  block_tokens=args.block_tokens, buffer_blocks=args.buffer_blocks)
        seed_row, seed_round = time_seed(data["npy"], args.batch, args.seed_batches, args.seed)
        rows.append(seed_row)
        print(_fmt_row(rows[-1]), flush=True)
        for row in time_ours(data["store"], args.batch, "none", None, **{**kw, "epochs": args.paired + 1},
                             seed_round=seed_round):
            rows.append(row)
            print(_fmt_row(row), flush=True)
        for row in time_raw_gathers(data["store"], args.batch, args.tokens // args.batch, args.seed):
            rows.append(row)
            print(_fmt_row(row), flush=True)
        if args.shuffle_run > 1:
            for row in time_ours(data["store"], args.batch, "none", None, **kw,
                                 shuffle_run=args.shuffle_run):
                rows.append(row)
                print(_fmt_row(row), flush=True)
        if not args.skip_normalized:
            from music_interpret.preprocess import compute_stats

            t0 = time.perf_counter()
            stats = compute_stats(data["store"], scratch_dir=folder)
            results["compute_stats_s"] = time.perf_counter() - t0
            results["compute_stats_tok_s"] = args.tokens / results["compute_stats_s"]
            print(f"compute_stats: {results['compute_stats_s']:.1f}s "
                  f"({results['compute_stats_tok_s']:,.0f} tok/s)", flush=True)
            for row in time_ours(data["store"], args.batch, "unit_mean_norm", stats, **kw):
                rows.append(row)
                print(_fmt_row(row), flush=True)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    seed_tok_s = next(r["tok_s"] for r in results["rows"] if r["approach"] == "seed")
    for r in results["rows"]:
        r["speedup_vs_seed"] = r["tok_s"] / seed_tok_s
    ours = [r for r in results["rows"] if r["approach"] == "ours" and r["normalization"] == "none"
            and r["shuffle_run"] == 1]
    runs = [r for r in results["rows"] if r["approach"] == "ours" and r["shuffle_run"] > 1]
    if runs:
        results["speedup_shuffle_run"] = runs[-1]["speedup_vs_seed"]
    paired = [r["tok_s"] / r["paired_seed_tok_s"] for r in ours if "paired_seed_tok_s" in r]
    results["paired_speedups"] = paired
    results["speedup"] = float(np.median(paired))  # steady epochs, each against its own seed round
    results["speedup_first_epoch"] = ours[0]["speedup_vs_seed"]
    raw = [r["tok_s"] for r in results["rows"] if r["approach"] == "raw gather"]
    if raw:  # how close ours (token level, steady epochs) comes to bare gathers from its mapping
        results["fraction_of_raw_gather"] = float(np.median([r["tok_s"] for r in ours[1:]])) / raw[0]
    results["failures"] = ([] if results["speedup"] >= MIN_SPEEDUP else
                           [f"ours is {results['speedup']:.1f}x faster than the seed loader "
                            f"(median of {len(paired)} paired epochs), goal {MIN_SPEEDUP:.0f}x"])
    return results


HEADER = ("| loader | normalization | batches timed | tokens/s | CPU % | speedup vs seed |\n"
          "|---|---|---|---:|---:|---:|")


def _fmt_row(r: dict[str, Any]) -> str:
    if r["approach"] == "raw gather":
        name, timed = f"bare index_select of random rows ({r['source']})", f"{r['batches']}"
        speed = f"{r['speedup_vs_seed']:.1f}x" if "speedup_vs_seed" in r else "-"
        return f"| {name} | none | {timed} | {r['tok_s']:,.0f} | - | {speed} |"
    if r["approach"] == "ours":
        name = "ActivationLoader (ours)" + (f", runs of {r['shuffle_run']}" if r["shuffle_run"] > 1 else "")
        timed = f"{r['batches']} (epoch {r['epoch'] + 1}{', pages the maps in' if r['epoch'] == 0 else ''})"
    else:
        name, timed = "seed Dataset + DataLoader", f"{r['batches']} (extrapolated)"
    cpu = f"{r['cpu_percent']:.0f}"
    speed = f"{r['speedup_vs_seed']:.1f}x" if "speedup_vs_seed" in r else "-"
    return f"| {name} | {r['normalization']} | {timed} | {r['tok_s']:,.0f} | {cpu} | {speed} |"


def table(results: dict[str, Any]) -> str:
    """Markdown table of the rows, with the machine line."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, "
        f"{results['threads']} torch threads, torch {results['torch']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'] or [])}, {m['date']}",
        f"Data: {results['tokens']:,} tokens x {results['d_model']} fp32 "
        f"({results['data_gib']:.1f} GiB), batches of {results['batch']}, shuffled, warm page cache",
        "",
        HEADER,
    ]
    lines += [_fmt_row(r) for r in results["rows"]]
    if results.get("paired_speedups"):
        p = results["paired_speedups"]
        lines.append(f"\nours (token level, epochs 2-{len(p) + 1}) against a seed round timed just "
                     f"before each epoch: median {results['speedup']:.1f}x "
                     f"(range {min(p):.1f}-{max(p):.1f}x); the goal is {MIN_SPEEDUP:.0f}x")
    if "fraction_of_raw_gather" in results:
        lines.append(f"ours (token level, steady epochs) delivers {results['fraction_of_raw_gather']:.2f} "
                     "of the bare gathers' rate from the same mapping")
    if "compute_stats_s" in results:
        lines.append(f"\ncompute_stats (preprocess statistics, 1 hook): "
                     f"{results['compute_stats_s']:.1f}s, {results['compute_stats_tok_s']:,.0f} tok/s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line options."""
    p = argparse.ArgumentParser(prog="python -m bench loader", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2_097_152)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--shard-tokens", type=int, default=262_144)
    p.add_argument("--block-tokens", type=int, default=65_536)
    p.add_argument("--buffer-blocks", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=None,
                   help="the loader's prefetch (default: its own choice, inline gathers on CPU)")
    p.add_argument("--seed-batches", type=int, default=16, help="timed batches of the seed loader")
    p.add_argument("--epochs", type=int, default=2,
                   help="timed epochs of ours with runs and with normalisation (the first pages the maps in)")
    p.add_argument("--paired", type=int, default=5,
                   help="steady epochs of ours (token level), each paired with a seed round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-run", type=int, default=16,
                   help="also time ours with this shuffle_run (1: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--dir", help="where the temporary data go (default: the system temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data")
    p.add_argument("--skip-normalized", action="store_true", help="skip the unit_mean_norm row")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 262,144 tokens, 2 seed batches, no result file")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seed_batches, args.shard_tokens = 262_144, 2, 65_536
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when below the speed-up goal)."""
    args = parse_args(argv)
    results = run(args)
    print()
    print(table(results))
    if not args.quick:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out, to_jsonable(results))  # temporary name, then rename
        print(f"\nwrote {args.out}")
    for failure in results["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
