"""``corpus``: the full ``--corpus all`` build (music21's bundled corpus -> MMT notes).

Runs :func:`music_interpret.adapters.mmt.corpus_build.build_corpus` in a fresh process
and records the wall time, songs/s and tasks/s (a task is one file or one abc tune), CPU
seconds of the main process and of the workers, and the peak resident memory of the
main process (``RUSAGE_SELF``) and of the largest worker (each worker's own
``ru_maxrss``, and ``RUSAGE_CHILDREN`` once they are reaped), with the per-sub-corpus
table. About an hour on 2 cores.

    python -m bench corpus [--workers N] [--out DIR] [--time-limit S] [--quick] [--progress]

``--out DIR`` keeps the dataset at ``DIR/music21_notes`` (default: a temporary folder,
removed afterwards). ``--quick``: three files, no result file.
Results: ``bench/results/corpus_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.machine import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "corpus_build.json"
QUICK = ["nottingham-dataset/reelsa-c.abc", "palestrina/Agnus_01.krn", "bach/bwv153.1.mxl"]

CHILD = """
import json, resource, sys
from pathlib import Path
from music_interpret.adapters.mmt.corpus_build import build_corpus, stats_table
out, workers, limit, progress = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
include = sys.argv[5:] or None
r = build_corpus(out, "music21", include=include, workers=workers, time_limit=limit,
                 progress=None if progress == "auto" else progress == "on")
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "seconds": r.seconds, "songs": len(r.songs),
    "tasks": len(r.songs) + sum(s.category not in ("excluded", "format", "twin")
                                for s in r.skipped),
    "skipped": len(r.skipped), "notes": r.stats["total"]["notes"],
    "tokens": r.stats["total"]["tokens"],
    "cpu_main_s": me.ru_utime + me.ru_stime, "cpu_workers_s": kids.ru_utime + kids.ru_stime,
    "main_peak_rss_mib": r.main_peak_rss_mib,
    "worker_peak_rss_mib": max(r.pool.worker_peak_rss_mib, kids.ru_maxrss / 1024),
    "worker_starts": r.pool.starts, "timeouts": r.pool.timeouts, "crashes": r.pool.crashes,
    "stats": r.stats, "table": stats_table(r.stats)}))
"""


def run_build(
    out: Path, workers: int, time_limit: float, include: list[str], progress: bool
) -> dict[str, Any]:
    """The build in a fresh interpreter; its JSON report."""
    progress_arg = "on" if progress or sys.stderr.isatty() else "off"
    cmd = [sys.executable, "-c", CHILD, str(out), str(workers), str(time_limit), progress_arg,
           *include]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: dict[str, Any]) -> str:
    """One Markdown row of the build's cost."""
    lines = [
        "| workers | tasks | songs | wall s | songs/s | tasks/s | CPU s (main + workers) "
        "| peak RSS main | peak RSS worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['workers']} | {result['tasks']:,} | {result['songs']:,} | "
        f"{result['seconds']:,.0f} | {result['songs_per_s']:.2f} | {result['tasks_per_s']:.2f} | "
        f"{result['cpu_main_s']:,.0f} + {result['cpu_workers_s']:,.0f} | "
        f"{result['main_peak_rss_mib']:,.0f} MiB | {result['worker_peak_rss_mib']:,.0f} MiB |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench corpus", description=__doc__)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--time-limit", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="keep the dataset in OUT/music21_notes")
    p.add_argument("--quick", action="store_true", help="three files, no result file")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    args = p.parse_args(argv)
    described = machine()  # load average before the build
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="mi-bench-corpus-"))
    try:
        include = QUICK if args.quick else []
        result = run_build(out, args.workers, args.time_limit, include, args.progress)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    result.update(
        machine=described,
        nice=os.nice(0),
        workers=args.workers,
        time_limit_s=args.time_limit,
        songs_per_s=result["songs"] / result["seconds"],
        tasks_per_s=result["tasks"] / result["seconds"],
    )
    print(result.pop("table"))
    print(table(result))
    if not args.quick:
        from music_interpret.engine import to_jsonable, write_json_atomic

        write_json_atomic(RESULTS, to_jsonable(result))  # temporary name, then rename
    return 0


if __name__ == "__main__":
    sys.exit(main())
