"""Export to SAELens 6 and sparsify layouts (files and numbers; the libraries themselves
are exercised in ``test_export_interop.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from music_interpret.errors import UserError
from music_interpret.learners.dictionary import Dictionary
from music_interpret.learners.export import SAELENS_VERSION, export_dictionary
from music_interpret.learners.holdout import holdout_songs
from music_interpret.learners.io import load_dictionary, save_dictionary
from music_interpret.loader import ActivationLoader
from music_interpret.stores.netcdf import check_store

from ..conftest import REPO
from .conftest import HOOKS, D


def make_dictionary(folder: Path, store: Path, *, k: int | None = None, b_dec_in: bool = True,
                    hook: str = HOOKS[1], seed: int = 0) -> Path:
    """A random dictionary saved as the train stage saves one, pointing at ``store``."""
    info = check_store(store)
    g = torch.Generator().manual_seed(seed)
    model = Dictionary(D, 48, k=k, apply_b_dec_to_input=b_dec_in)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if k:
            model.normalize_decoder()
    held = holdout_songs(info.songs, 0.25, seed)
    config = {"hook_point": hook, "learner": {"name": "topk" if k else "relu_l1"},
              "normalization": {"loader": {"mode": "none"}, "input_scale": 1.0, "folded": True},
              "training": {"holdout_songs": [info.songs[i] for i in held], "filters": {}},
              "data": {"store_path": str(store), "store_id": info.manifest["store_id"],
                       "dataset": "data/base/x_notes/notes"},
              "model": {"name": "mmt", "path": "models/x/y", "sha256": "ab" * 32, "context_size": 1024}}
    return save_dictionary(folder, model, config)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "music_interpret", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("k", [None, 5])
def test_saelens_files(store: Path, tmp_path: Path, k: int | None) -> None:
    folder = make_dictionary(tmp_path / "d", store, k=k)
    out = export_dictionary(folder, tmp_path / "out", "saelens")
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if k else "standard") and cfg.get("k") == k
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == SAELENS_VERSION and "meta" not in cfg
    assert meta["hook_name"] == HOOKS[1] and meta["hook_layer"] == 1
    assert meta["model_path"] == "models/x/y" and meta["dataset_path"] == "data/base/x_notes/notes"
    assert meta["normalization"]["folded_into_weights"] is True
    ours, theirs = load_file(folder / "weights.safetensors"), load_file(out / "sae_weights.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    # sparsity: log10 firing density over the held-out songs, counted independently here
    sparsity = load_file(out / "sparsity.safetensors")["sparsity"]
    info = check_store(store)
    cfg_d = json.loads((folder / "config.json").read_text())
    held = [info.songs.index(n) for n in cfg_d["training"]["holdout_songs"]]
    x = next(iter(ActivationLoader(store, HOOKS[1], 10**6, shuffle=False, filters={"song": held})))
    density = (load_dictionary(folder).encode(x) > 0).double().mean(0)
    assert torch.allclose(sparsity, torch.log10(density + 1e-10).float())
    assert str(len(x)) in meta["sparsity_source"]


@pytest.mark.parametrize(("k", "b_dec_in"), [(5, True), (None, False)])
def test_sparsify_files_match_ours(store: Path, tmp_path: Path, k: int | None, b_dec_in: bool) -> None:
    folder = make_dictionary(tmp_path / "d", store, k=k, b_dec_in=b_dec_in)
    out = export_dictionary(folder, tmp_path / "out", "sparsify")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["activation"] == "topk" and cfg["k"] == (k or 48) and cfg["d_in"] == D
    t = load_file(out / "sae.safetensors")
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    meta = json.loads((out / "music_interpret.json").read_text())
    assert meta["hook_name"] == HOOKS[1] and meta["source_architecture"] == ("topk" if k else "relu")
    # sparsify's encode (relu, top-k on x - b_dec) and decode, written out here
    x = torch.randn(40, D) * 3
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, index = pre.topk(cfg["k"], dim=-1)
    recon = (torch.zeros_like(pre).scatter(-1, index, values)) @ t["W_dec"] + t["b_dec"]
    model = load_dictionary(folder)
    assert torch.allclose(recon, model(x), atol=1e-5)


def test_export_cli_and_errors(store: Path, tmp_path: Path) -> None:
    folder = make_dictionary(tmp_path / "d", store)
    result = run_cli("export", str(folder), "--format", "saelens", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "o"
    again = run_cli("export", str(folder), "--out", str(tmp_path / "o"))
    assert again.returncode == 2 and "o: exists and is not an empty folder" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    missing = run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "p"))
    assert missing.returncode == 2 and "nope/config.json: not a dictionary folder" in missing.stderr
    moved = make_dictionary(tmp_path / "m", store)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"]["store_path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"gone: the activation store .* --store PATH"):
        export_dictionary(moved, tmp_path / "q")
    assert export_dictionary(moved, tmp_path / "q", store=store).exists()
    assert not (tmp_path / "r").exists()
    export_dictionary(moved, tmp_path / "r", sparsity=False)
    assert not (tmp_path / "r" / "sparsity.safetensors").exists()
    assert not list(tmp_path.glob(".*partial*"))
