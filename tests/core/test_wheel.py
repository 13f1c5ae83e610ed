"""The wheel ships what an installed package needs: package data, py.typed, the licence,
metadata (version written once, extras, URLs) and the entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO


def _setuptools_ok() -> bool:
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        return False
    return major >= 77  # PEP 639 licence fields; bdist_wheel without the wheel package


@pytest.mark.skipif(not _setuptools_ok(), reason="needs setuptools >= 77 installed (offline build)")
def test_wheel_contents(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "music_interpret", src / "music_interpret",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("music_interpret-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {"music_interpret/py.typed", "music_interpret/data/plugins.yaml",
            "music_interpret/stores/schema.py", f"{info}/licenses/LICENSE"} <= names
    assert not any(n.startswith(("tests/", "bench/", "plugins/")) for n in names)
    version = metadata.version("music-interpret")
    assert f"Version: {version}" in meta and "License-Expression: MIT" in meta
    assert "Requires-Dist: scipy" in meta and 'music21>=9.1; extra == "demo"' in meta
    assert 'distributed>=2024.1; extra == "dask"' in meta and "Project-URL:" in meta
    assert "music21" not in meta.split("Provides-Extra")[0]  # not a core dependency
    assert "music-interpret = music_interpret.cli:main" in entry_points
    assert "[music_interpret]" in entry_points and "stages = music_interpret.stages.plugin" in entry_points
