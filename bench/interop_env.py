"""Create the interop environment ``bench/.venv-saelens``: SAELens and EleutherAI sparsify.

Neither library is installed into the project venv: the interop test
(``tests/learners/test_export_interop.py``) runs them in this environment through a
subprocess, and is skipped when it does not exist. Usage::

    python bench/interop_env.py [--force]

torch goes in first, from the machine's CPU wheel when there is one, and is pinned by a
constraints file for the rest, so that nothing pulls a (multi-GB) CUDA build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-saelens"
TORCH_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
TORCH_VERSION = "2.13.0"
SAELENS_VERSION = "6.54.12"
SPARSIFY_VERSION = "1.3.3"


def python() -> Path:
    """The environment's interpreter."""
    return VENV / "bin" / "python"


def ready() -> bool:
    """True when the environment imports both libraries at the pinned versions."""
    if not python().exists():
        return False
    code = ("import importlib.metadata as m, sae_lens, sparsify;"
            f"assert m.version('sae-lens') == '{SAELENS_VERSION}';"
            f"assert m.version('eai-sparsify') == '{SPARSIFY_VERSION}'")
    return subprocess.run([str(python()), "-c", code], capture_output=True).returncode == 0


def _pip(*args: str) -> None:
    cmd = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def create(force: bool = False) -> Path:
    """Build ``bench/.venv-saelens`` when needed; returns its interpreter."""
    if ready() and not force:
        return python()
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    _pip(str(TORCH_WHEELS[0]) if TORCH_WHEELS else f"torch=={TORCH_VERSION}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(f"torch=={TORCH_VERSION}\n")
        constraints = fh.name
    try:
        _pip("-c", constraints, f"sae-lens=={SAELENS_VERSION}", f"eai-sparsify=={SPARSIFY_VERSION}")
    finally:
        Path(constraints).unlink(missing_ok=True)
    if not ready():
        raise SystemExit(f"{VENV}: SAELens {SAELENS_VERSION} / sparsify {SPARSIFY_VERSION} "
                         "environment is not usable")
    return python()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    args = parser.parse_args(argv)
    print(create(args.force))


if __name__ == "__main__":
    main()
