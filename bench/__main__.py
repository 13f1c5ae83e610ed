"""``python -m bench [NAME ...] [-- OPTIONS]``: run all benchmarks, or the named ones.

Each benchmark is a module ``bench/<name>.py`` with a top-level ``main(argv) -> int``;
helpers (``env``, ``xt_reference``) and ``_private`` modules are not benchmarks. Options
after the names (e.g. ``python -m bench mmt_forward --quick``) go to every named benchmark.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

HELPERS = {"env", "interop_env", "xt_reference", "gpu_check"}  # gpu_check: bench/gpu_check.sh on a GPU


def benchmarks() -> list[str]:
    """Benchmark module names in ``bench/``, found without importing them."""
    here = Path(__file__).resolve().parent
    return sorted(
        f.stem
        for f in here.glob("*.py")
        if not f.stem.startswith("_")
        and f.stem not in HELPERS
        and re.search(r"^def main\(", f.read_text(encoding="utf-8"), re.M)
    )


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; the exit status is non-zero if any failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = []
    while argv and not argv[0].startswith("-"):
        names.append(argv.pop(0))
    if argv[:1] == ["--"]:
        argv.pop(0)
    if argv[:1] in (["-h"], ["--help"]) and not names:
        print(__doc__.strip() + "\n\nbenchmarks: " + ", ".join(benchmarks()))
        return 0
    known = benchmarks()
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; have {known}", file=sys.stderr)
        return 2
    status = 0
    for name in names or known:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        status |= module.main(argv)
    return status


if __name__ == "__main__":
    sys.exit(main())
