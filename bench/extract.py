"""Extraction benchmark: the whole ``extract`` stage against a bare forward pass.

1. Throughput: tokens/s of the stage (engine start, model load, reading notes,
   windows, forward passes, writing netCDF shards) against bare forward passes of
   the same model over the same batches with nothing else (prepared beforehand, no
   I/O). Goal: the stage reaches >= 0.85 of it. A second reference runs the whole
   dataset's windows sorted globally in fixed batches of 8 (the least padding a
   fixed batch size allows, but it needs every window in memory at once): it shows
   what the stage's per-shard length batching costs or saves. A third runs the stage's
   batches the way the stage runs them on CPU: on its forward workers (two threads
   sharing torch's threads, each taking the next batch; see ``ExtractConfig``). The goal
   is checked against the plain loop (one batch at a time on every torch thread); the
   ratio to the third shows what the rest of the stage (reading, planning, gathering,
   writing) costs on top of the same forward passes. The four alternate; each
   ratio is the median over repeats of bare / stage within each repeat (runs next to
   each other share the machine's state, which on a shared VM drifts by 10-30%).
2. Peak memory: peak RSS of the stage run in a fresh process on 1x and 4x the
   data, where 4x is the same songs four times over (same window lengths, so only
   the amount of data changes). Goal: flat (shards bound the memory, not the dataset).

    python -m bench extract [--songs 307] [--memory-songs 60] [--model models/bach/demo]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import machine as machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "extract.json"
HOOKS = ["resid_post.1", "resid_post.3"]
SHARD_MB = 16.0  # several shards on the demo, so that writing overlaps the forward passes


DATA = ROOT / "data" / "base" / "bach_notes"


def _pipeline(tmp: Path, model: Path, songs: int, run: str, shard_mb: float,
              data: Path = DATA) -> Path:
    path = tmp / f"{run}.yaml"
    path.write_text(textwrap.dedent(f"""
        run: {run}
        output_dir: {tmp / 'reports'}
        device: cpu
        stages: [extract]
        model: {{path: {model}}}
        data: {{path: {data}}}
        extract:
          hooks: {json.dumps(HOOKS)}
          batch_size: 8
          max_songs: {songs}
          output: {tmp / 'acts' / run}
          store: {{name: netcdf, shard_mb: {shard_mb}}}
    """))
    return path


def stage_throughput(tmp: Path, model: Path, songs: int, run: str,
                     data: Path = DATA) -> tuple[float, int]:
    """(seconds, tokens) of one in-process run of the extract stage."""
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import get_registry

    registry = get_registry()
    pipeline = load_pipeline(_pipeline(tmp, model, songs, run, SHARD_MB, data), registry)
    t0 = time.perf_counter()
    manifest = Engine(pipeline, registry, log=lambda _m: None).run(force=True)
    seconds = time.perf_counter() - t0
    return seconds, int(manifest["stages"]["extract"]["summary"]["tokens"])


def _padded(adapter: Any, groups: list[list[Any]]) -> list[tuple[Any, Any]]:
    """(codes, mask) tensors of window groups, padded by the adapter as the stage pads them."""
    batches = [adapter.pad([w.inputs for w in group]) for group in groups]
    return [(b.codes, b.mask) for b in batches]


def forward_batches(adapter: Any, songs: int, policy: str,
                    data: Path = DATA) -> tuple[list[tuple[Any, Any]], int]:
    """The batches of forward passes over ``songs`` demo songs, and their stored tokens.

    ``stage``: exactly the stage's batches (its shard plans at ``SHARD_MB`` and its
    length batching); ``global``: every window sorted by length, fixed batches of 8.
    """
    from music_interpret.stages.extract import ExtractConfig, shard_batches, take_shard
    from music_interpret.stages.extract_plan import SongPlanner
    from music_interpret.stores.netcdf import NetCDFStoreConfig

    dataset = adapter.open_dataset(data)
    names = list(dataset.names)[:songs]
    if policy == "global":
        windows = [w for name in names
                   for w in adapter.song_windows(adapter.tokenize(dataset.read(name)))]
        windows.sort(key=lambda w: -len(w))
        groups = [windows[b : b + 8] for b in range(0, len(windows), 8)]
        return _padded(adapter, groups), int(sum(int(w.owned.sum()) for w in windows))
    config = ExtractConfig(hooks=HOOKS, batch_size=8)
    per_shard = NetCDFStoreConfig(shard_mb=SHARD_MB).tokens_per_shard(len(HOOKS), adapter.d_model)
    groups, tokens = [], 0
    stats: dict[str, Any] = {"dropped_notes": 0}
    planner = SongPlanner(adapter, dataset, names, notes_only=False,
                          note=adapter.event_vocabulary().note, stride=None)
    songs_iter = planner.plans(range(len(names)))
    while (plan := take_shard(songs_iter, stats, shard_tokens=per_shard)) is not None:
        groups += [[plan.windows[i][2] for i in idx]
                   for idx in shard_batches(plan, config.batch_size, config.length_slack)]
        tokens += plan.n_tokens
    return _padded(adapter, groups), tokens


def bare_forward(model: Path, songs: int, policy: str = "stage",
                 data: Path = DATA, workers: int = 1) -> tuple[float, int]:
    """(seconds, tokens) of forward passes alone over prepared batches (see forward_batches).

    ``workers`` > 1: that many threads take the batches as the stage's forward workers
    do, sharing torch's threads out between them.
    """
    import torch

    from music_interpret.adapters.mmt.adapter import MMTAdapter

    adapter = MMTAdapter()
    adapter.load(model)
    batches, tokens = forward_batches(adapter, songs, policy, data)

    def forward(batch: tuple[Any, Any]) -> None:
        with torch.no_grad():
            adapter.model.net.run(*batch, capture=HOOKS, logits=False)

    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    try:
        t0 = time.perf_counter()
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(forward, batches))
        else:
            for batch in batches:
                forward(batch)
        return time.perf_counter() - t0, tokens
    finally:
        torch.set_num_threads(threads)


def replicated_dataset(tmp: Path, songs: int, copies: int) -> Path:
    """A notes folder holding the first ``songs`` demo songs ``copies`` times over."""
    src = ROOT / "data" / "base" / "bach_notes" / "notes"
    names = (src / "names.txt").read_text().split()[:songs]
    out = tmp / f"data{copies}x{songs}" / "notes"
    out.mkdir(parents=True)
    for k in range(copies):
        for name in names:
            (out / f"{name}-{k}.npy").symlink_to(src / f"{name}.npy")
    return out


def peak_rss_mb(tmp: Path, model: Path, songs: int, copies: int) -> float:
    """Peak RSS (MiB) of a fresh process extracting ``copies`` x ``songs`` songs."""
    data = replicated_dataset(tmp, songs, copies)
    pipeline = _pipeline(tmp, model, songs * copies, f"m{copies}", 8.0, data)
    cmd = [sys.executable, "-m", "music_interpret", "run", str(pipeline), "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024


def throughput(tmp: Path, model: Path, songs: int, copies: int, repeats: int) -> dict[str, Any]:
    """Stage vs bare forward on ``copies`` x ``songs`` demo songs (medians of ``repeats``)."""
    data = DATA if copies == 1 else replicated_dataset(tmp, songs, copies).parent
    n = songs * copies
    from music_interpret.stages.extract import default_forward_workers

    workers = default_forward_workers("cpu")
    stage, bare, glob, same = [], [], [], []
    for i in range(repeats):  # alternate, so that load on the machine hits all four alike
        stage.append(stage_throughput(tmp, model, n, f"s{copies}-{i}", data))
        bare.append(bare_forward(model, n, "stage", data))
        glob.append(bare_forward(model, n, "global", data))
        same.append(bare_forward(model, n, "stage", data, workers))
    s_sec, b_sec, g_sec, w_sec = (float(np.median([s for s, _ in runs])) for runs in (stage, bare, glob, same))
    tokens = stage[0][1]
    assert tokens == bare[0][1] == glob[0][1] == same[0][1], "stage and bare forward must see the same tokens"

    def ratio(reference: list[tuple[float, int]]) -> tuple[float, list[float]]:
        paired = [b / s for (s, _), (b, _) in zip(stage, reference, strict=True)]
        return float(np.median(paired)), paired

    return {"songs": n, "tokens": tokens, "forward_workers": workers,
            "stage_tokens_per_s": tokens / s_sec,
            "bare_forward_tokens_per_s": tokens / b_sec,
            "bare_forward_global_sort_tokens_per_s": tokens / g_sec,
            "bare_forward_same_workers_tokens_per_s": tokens / w_sec,
            "ratio": ratio(bare)[0], "ratio_vs_global_sort": ratio(glob)[0],
            "ratio_vs_same_workers": ratio(same)[0],
            "ratio_of_median_times": b_sec / s_sec, "paired_ratios": ratio(bare)[1],
            "paired_ratios_vs_same_workers": ratio(same)[1],
            "seconds": {"stage": [s for s, _ in stage], "bare": [s for s, _ in bare],
                        "bare_global_sort": [s for s, _ in glob],
                        "bare_same_workers": [s for s, _ in same]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench extract", description=__doc__)
    p.add_argument("--songs", type=int, default=307)
    p.add_argument("--memory-songs", type=int, default=60)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "bach" / "demo")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--scale", type=int, default=4,
                   help="the goal is checked on this many copies of the demo songs (start-up costs "
                        "of the stage, about 0.1 s, weigh less than on the 3 s demo)")
    ns, _ = p.parse_known_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as d:
        tmp = Path(d)
        stage_throughput(tmp, ns.model, ns.songs, "warm-up")  # imports, page cache
        scales = {f"{c}x": throughput(tmp, ns.model, ns.songs, c, ns.repeats) for c in (1, ns.scale)}
        # memory: separate processes, smallest first (ru_maxrss of children is a running max)
        rss_1x = peak_rss_mb(tmp, ns.model, ns.memory_songs, 1)
        rss_4x = peak_rss_mb(tmp, ns.model, ns.memory_songs, 4)
    result = {
        "benchmark": "extract",
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "model": str(ns.model.relative_to(ROOT) if ns.model.is_relative_to(ROOT) else ns.model),
        "hooks": HOOKS,
        "songs": ns.songs,
        "throughput": scales,
        "goal_scale": f"{ns.scale}x",
        "ratio": scales[f"{ns.scale}x"]["ratio"],
        "goal_ratio": 0.85,
        "peak_rss_mb": {"1x": rss_1x, "4x": rss_4x},
        "memory_songs": ns.memory_songs,
        "peak_rss_note": "separate fresh processes, shard_mb 8; 4x = the same songs four times",
    }
    print(f"{'tokens/s':40}" + "".join(f"{k:>12}" for k in scales))
    for label, key in (("bare forward, same batches", "bare_forward_tokens_per_s"),
                       ("bare forward, global sort, batch 8", "bare_forward_global_sort_tokens_per_s"),
                       ("bare forward, stage's forward workers", "bare_forward_same_workers_tokens_per_s"),
                       ("extract stage (end to end)", "stage_tokens_per_s"),
                       ("stage / bare", "ratio"), ("stage / global-sort bare", "ratio_vs_global_sort"),
                       ("stage / bare with its workers", "ratio_vs_same_workers")):
        print(f"{label:40}" + "".join(f"{v[key]:>12,.3f}" if v[key] < 10 else f"{v[key]:>12,.0f}"
                                      for v in scales.values()))
    print(f"goal: stage / bare >= 0.85 at {ns.scale}x the demo ({result['ratio']:.3f})")
    print(f"peak RSS: {rss_1x:.0f} MiB at {ns.memory_songs} songs, "
          f"{rss_4x:.0f} MiB at 4 x {ns.memory_songs} songs")
    from music_interpret.jsonio import to_jsonable, write_json_atomic

    write_json_atomic(RESULTS, to_jsonable(result))  # temporary name, then rename
    print(f"wrote {RESULTS}")
    failures = []
    if result["ratio"] < result["goal_ratio"]:
        failures.append(f"stage / bare = {result['ratio']:.3f} < {result['goal_ratio']}")
    if rss_4x > 1.1 * rss_1x:
        failures.append(f"peak RSS grows with the data: {rss_1x:.0f} -> {rss_4x:.0f} MiB")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
