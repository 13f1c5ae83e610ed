"""Shared test helpers: fake installed distributions that declare entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def available_devices() -> list[str]:
    """``cpu``, plus ``cuda`` where a GPU is visible: tests of every stage run on each, so
    the same suite catches device bugs on a GPU machine."""
    import torch

    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


DEVICES = available_devices()


def share_cpus_between_workers() -> None:
    """Under pytest-xdist each worker takes its share of the CPUs, for its own torch threads
    and (through ``OMP_NUM_THREADS``) for the CLI subprocesses it starts: two workers that
    each run two threads on two cores thrash instead of running side by side."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    import torch

    from music_interpret.resources import usable_cpus

    share = max(1, usable_cpus() // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


share_cpus_between_workers()


def make_distribution(site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str],
                      version: str = "1.0.0") -> Path:
    """Install a distribution into ``site`` the way pip lays one out (dist-info + modules)."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[music_interpret]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "RECORD").write_text("")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    return site


def run_cli(*args: str, site: Path | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m music_interpret ARGS`` in a subprocess, with ``site`` on PYTHONPATH."""
    full_env = dict(os.environ)
    full_env.pop("MUSIC_INTERPRET_DISABLE_PLUGIN_AUTOLOAD", None)
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "music_interpret", *args], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn (see :func:`available_devices`)."""
    return request.param


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
