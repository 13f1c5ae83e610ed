"""A small synthetic store whose tokens are sparse combinations of a hidden dictionary."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ..store import make_store

D = 16
HOOKS = ("resid_post.0", "resid_post.1")
SHARDS = (900, 700, 800, 600)  # 2 songs per shard: 8 songs


def sparse_data(n: int, d: int = D, atoms: int = 24, active: int = 3, seed: int = 0) -> np.ndarray:
    """(n, hooks, d): x = offset + sum of ``active`` random atoms with random magnitudes."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(HOOKS), d), np.float32)
    for h in range(len(HOOKS)):
        dic = rng.normal(size=(atoms, d))
        codes = np.zeros((n, atoms))
        idx = rng.integers(0, atoms, (n, active))
        np.put_along_axis(codes, idx, rng.uniform(0.5, 3.0, (n, active)), axis=1)
        out[:, h] = codes @ dic + rng.normal(0, 2, d) + rng.normal(0, 0.05, (n, d))
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = make_store(tmp_path_factory.mktemp("sae") / "store", sparse_data(sum(SHARDS)), SHARDS)
    return path


def pipeline(tmp: Path, store: Path, train: str, run: str = "r") -> Path:
    """A pipeline.yaml running only ``train`` on ``store`` (``train`` is YAML, indented freely)."""
    path = tmp / f"{run}.yaml"
    body = textwrap.indent(textwrap.dedent(train).strip() + f"\nstore: {store}\n", "  ")
    path.write_text(f"run: {run}\noutput_dir: {tmp / 'reports'}\nstages: [train]\ndevice: cpu\n"
                    f"train:\n{body}")
    return path
