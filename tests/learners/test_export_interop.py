"""Our exports loaded by SAELens 6 and EleutherAI sparsify themselves.

Both run in their own environment ``bench/.venv-saelens`` (``python bench/interop_env.py``),
in a subprocess; the test is skipped when that environment does not exist. The codes
and reconstructions of SAELens / sparsify on random inputs must equal ours within
``TOL`` = 1e-5 x max(1, max |ours|) (float32 matmuls in another order).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.learners.export import SAELENS_VERSION, export_dictionary
from music_interpret.learners.io import load_dictionary

from ..conftest import REPO
from .conftest import HOOKS, D
from .test_export import make_dictionary

PYTHON = REPO / "bench" / ".venv-saelens" / "bin" / "python"
TOL = 1e-5

pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason="no bench/.venv-saelens "
                                "(python bench/interop_env.py builds it)")

SAELENS = """
import json, sys, numpy as np, torch
from safetensors import safe_open
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
path, x = sys.argv[1], torch.from_numpy(np.load(sys.argv[2]))
cfg = json.load(open(f"{path}/cfg.json"))
# the pre-6 path rebuilds the metadata from SAELens's known keys only (hook_layer is lost)
legacy = "hook_layer" not in handle_config_defaulting(json.loads(json.dumps(cfg)))["metadata"]
sae = SAE.load_from_disk(path)
with torch.no_grad():
    codes = sae.encode(x)
    recon = sae.decode(codes)
np.save(sys.argv[3], codes.numpy()); np.save(sys.argv[4], recon.numpy())
with safe_open(f"{path}/sparsity.safetensors", "pt") as f:
    sparsity = f.get_tensor("sparsity")
m = sae.cfg.metadata
print(json.dumps({"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                  "k": getattr(sae.cfg, "k", None), "hook_name": m.hook_name,
                  "hook_layer": m.hook_layer, "sae_lens_version": m.sae_lens_version,
                  "model_path": m.model_path, "normalization": m.normalization,
                  "sparsity_shape": list(sparsity.shape), "legacy": legacy}))
"""

SPARSIFY = """
import json, sys, numpy as np, torch
from sparsify import Sae
path, x = sys.argv[1], torch.from_numpy(np.load(sys.argv[2]))
sae = Sae.load_from_disk(path)
with torch.no_grad():
    enc = sae.encode(x)
    recon = sae.decode(enc.top_acts, enc.top_indices)
codes = torch.zeros(len(x), sae.num_latents).scatter(-1, enc.top_indices, enc.top_acts)
np.save(sys.argv[3], codes.numpy()); np.save(sys.argv[4], recon.numpy())
print(json.dumps({"k": sae.cfg.k, "num_latents": sae.num_latents, "d_in": sae.d_in}))
"""


def run_in_env(script: str, export: Path, x: np.ndarray, tmp: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    np.save(tmp / "x.npy", x)
    result = subprocess.run([str(PYTHON), "-c", textwrap.dedent(script), str(export), str(tmp / "x.npy"),
                             str(tmp / "codes.npy"), str(tmp / "recon.npy")],
                            capture_output=True, text=True, timeout=300, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(tmp / "codes.npy"), \
        np.load(tmp / "recon.npy")


def inputs(folder: Path, n: int = 256) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Random inputs around the dictionary's b_dec, and our codes and reconstructions."""
    model = load_dictionary(folder)
    x = (torch.randn(n, D, generator=torch.Generator().manual_seed(1)) * 3 + model.b_dec).float()
    return x.numpy(), model.encode(x), model.decode(model.encode(x))


def close(theirs: np.ndarray, ours: torch.Tensor) -> float:
    """Max |theirs - ours|, checked against TOL x max(1, max |ours|)."""
    diff = float(np.abs(theirs - ours.numpy()).max())
    assert diff <= TOL * max(1.0, float(ours.abs().max())), diff
    return diff


@pytest.mark.parametrize("k", [None, 6])
def test_saelens_loads_our_export(store: Path, tmp_path: Path, k: int | None) -> None:
    folder = make_dictionary(tmp_path / "d", store, k=k)
    out = export_dictionary(folder, tmp_path / "saelens", "saelens")
    x, codes, recon = inputs(folder)
    info, their_codes, their_recon = run_in_env(SAELENS, out, x, tmp_path)
    assert info["class"] == ("TopKSAE" if k else "StandardSAE")
    assert info["architecture"] == ("topk" if k else "standard") and info["k"] == (k or None)
    assert info["hook_name"] == HOOKS[1] and info["hook_layer"] == 1  # current path keeps it
    assert info["sae_lens_version"] == SAELENS_VERSION and not info["legacy"]
    assert info["model_path"] == "models/x/y" and info["normalization"]["training"] == "none"
    assert info["sparsity_shape"] == [48]
    print(f"SAELens k={k}: codes {close(their_codes, codes):.2e}, recon {close(their_recon, recon):.2e}")


@pytest.mark.parametrize(("k", "b_dec_in"), [(6, True), (None, True), (None, False)])
def test_sparsify_loads_our_export(store: Path, tmp_path: Path, k: int | None, b_dec_in: bool) -> None:
    folder = make_dictionary(tmp_path / "d", store, k=k, b_dec_in=b_dec_in)
    out = export_dictionary(folder, tmp_path / "sparsify", "sparsify")
    x, codes, recon = inputs(folder)
    info, their_codes, their_recon = run_in_env(SPARSIFY, out, x, tmp_path)
    assert info == {"k": k or 48, "num_latents": 48, "d_in": D}
    print(f"sparsify k={k} b_dec_in={b_dec_in}: codes {close(their_codes, codes):.2e}, "
          f"recon {close(their_recon, recon):.2e}")
