"""Create the benchmark's own environment ``bench/.venv-xt`` with x-transformers 0.25.9.

x-transformers is never installed into the project venv: the reference model only runs
under ``bench/.venv-xt/bin/python``. Usage: ``python bench/env.py [--force]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-xt"
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
XT_VERSION = "0.25.9"
# x-transformers 0.25.9 imports torch, einops and entmax; installed with --no-deps so that
# its requirements can never pull a different (CUDA) torch build.
EXTRA = ("einops==0.8.2", "numpy")
ENTMAX = "entmax==1.3"


def python() -> Path:
    """The environment's interpreter."""
    return VENV / "bin" / "python"


def ready() -> bool:
    """True if the environment exists and imports x-transformers at the pinned version."""
    if not python().exists():
        return False
    code = (
        "import importlib.metadata as m, x_transformers, einops, numpy, torch;"
        f"assert m.version('x-transformers') == '{XT_VERSION}'"
    )
    return subprocess.run([str(python()), "-c", code], capture_output=True).returncode == 0


def _pip(*args: str) -> None:
    cmd = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def create(force: bool = False) -> Path:
    """Build ``bench/.venv-xt`` if needed; returns its interpreter."""
    if ready() and not force:
        return python()
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    torch_spec = str(TORCH_WHEEL) if TORCH_WHEEL.exists() else "torch"
    # torch first (its own dependencies are small CPU-only packages)
    _pip(torch_spec)
    _pip(*EXTRA)
    _pip("--no-deps", ENTMAX, f"x-transformers=={XT_VERSION}")
    if not ready():
        raise SystemExit(f"{VENV}: x-transformers {XT_VERSION} environment is not usable")
    return python()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    args = parser.parse_args(argv)
    print(create(args.force))


if __name__ == "__main__":
    main()
