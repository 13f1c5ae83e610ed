"""The seed training command's defaults: a recipe that converges, its own store and run
folder, downstream loss from the model and data the store records; short-run warnings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import music_interpret as mi
from music_interpret.errors import UserError
from music_interpret.learners.job import warn_if_short
from music_interpret.provenance import Recorded, recorded_inputs
from music_interpret.train import build_parser, build_pipeline

from ..conftest import FIXTURES, REPO

MODEL = FIXTURES / "mmt" / "models" / "bach" / "ape-tiny"
DATA = FIXTURES / "mmt" / "data" / "quartets" / "processed"


def seed_store(root: Path, store: Path, where: str = "bach/tiny") -> Path:
    dst = root / "data" / "activations" / where
    shutil.copytree(store, dst)
    return dst


def test_defaults_give_the_demo_recipe(tmp_path: Path, store: Path) -> None:
    seed_store(tmp_path, store)
    ns = build_parser().parse_args(["s", "e", "bach/tiny", "--input-dim", "16", "--latent-dim", "32",
                                    "--root", str(tmp_path)])
    train = build_pipeline(ns)["train"]
    assert train["learner"] == {"name": "relu_l1", "d_sae": 32, "lr": 1e-3, "batch_size": 1024,
                                "l1_coeff": 2.0}
    assert train["steps"] == 2500  # 3,000 tokens: one epoch is shorter
    ns = build_parser().parse_args(["s", "e", "bach/tiny", "--input-dim", "16", "--latent-dim", "32",
                                    "--root", str(tmp_path), "--learner", "topk", "--k", "4"])
    assert build_pipeline(ns)["train"]["learner"] == {"name": "topk", "d_sae": 32, "k": 4}


def test_own_store_and_run_folder(tmp_path: Path, store: Path) -> None:
    seed_store(tmp_path, store, "demo")
    args = ["--input-dim", "16", "--latent-dim", "8", "--root", str(tmp_path)]
    with pytest.raises(UserError, match=r"bach/demo: no activation store here \(stores under .*: demo;"):
        build_pipeline(build_parser().parse_args(["bach", "e", "bach/demo", *args]))
    (tmp_path / "reports" / "demo").mkdir(parents=True)
    (tmp_path / "reports" / "demo" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match=r"reports/demo: is the run folder of another run"):
        build_pipeline(build_parser().parse_args(["demo", "relu_l1", "demo", *args]))


def test_short_runs_warn(capsys: pytest.CaptureFixture[str]) -> None:
    warn_if_short("resid_post.3", 19, 5e-5)
    err = capsys.readouterr().err
    assert "resid_post.3: 19 steps at lr 5e-05" in err and "too short to converge" in err
    warn_if_short("resid_post.3", 2500, 1e-3)
    assert capsys.readouterr().err == ""


def test_recorded_inputs_of_old_and_new_stores(tmp_path: Path) -> None:
    model, data = tmp_path / "m", tmp_path / "d"
    model.mkdir(), data.mkdir()
    old = {"source": f"mmt adapter; checkpoint {model} sha256 {'ab' * 32}", "dataset": str(data)}
    assert recorded_inputs(old) == Recorded("mmt", model, data, None)
    new = {"model_adapter": "mmt", "model_path": str(model), "data_path": str(data)}
    assert recorded_inputs(new) == Recorded("mmt", model, data, None)
    assert "is gone" in recorded_inputs({**new, "model_path": str(tmp_path / "x")})
    assert recorded_inputs({}) == "the store records no model and data"


def test_seed_command_measures_downstream_from_the_store(tmp_path: Path) -> None:
    mi.run({"run": "x", "stages": ["extract"], "output_dir": str(tmp_path / "reports"),
            "model": {"path": str(MODEL)}, "data": {"path": str(DATA)},
            "extract": {"layers": [1], "max_songs": 6,
                        "output": str(tmp_path / "data" / "activations" / "quartets" / "tiny")}})
    cmd = [sys.executable, "-m", "music_interpret.train", "quartets", "relu_l1", "quartets/tiny",
           "--input-dim", "64", "--latent-dim", "32", "--root", str(tmp_path), "--steps", "20",
           "--batch-size", "64", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "downstream evaluation on the model and data the store was extracted from" in result.stderr
    assert "too short to converge" in result.stderr and "no downstream" not in result.stderr
    folder = tmp_path / "reports" / "quartets" / "relu_l1" / "train" / "dictionaries" / "resid_post.1"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["downstream"] and json.loads((folder / "config.json").read_text())["model"]["path"]
