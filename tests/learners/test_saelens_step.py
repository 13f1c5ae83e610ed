"""The benchmark's rebuilt SAELens training step (``bench/saelens_step.py``) against SAELens itself.

SAELens runs in its own environment ``bench/.venv-saelens`` (``python bench/interop_env.py``)
in a subprocess; the test is skipped when that environment does not exist. From the same
weights and batches, both must give the same loss terms and gradients (dead latents
included, for AuxK) and the same weights after several training steps, in float32 up to
summation order.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from bench.saelens_step import SAELENS_VERSION, PeerSAE, PeerTrainer

from ..conftest import REPO

PYTHON = REPO / "bench" / ".venv-saelens" / "bin" / "python"
D_IN, D_SAE, N, K, L1, LR, STEPS = 16, 96, 64, 8, 0.7, 3e-3, 5

pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason="no bench/.venv-saelens "
                                "(python bench/interop_env.py builds it)")

SCRIPT = """
import dataclasses, json, sys, torch
import importlib.metadata as md
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
arch, path = sys.argv[1], sys.argv[2]
d = torch.load(path)
kw = dict(d_in=d["d_in"], d_sae=d["d_sae"], dtype="float32", device="cpu")
sae = (StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=d["l1"], **kw)) if arch == "standard"
       else TopKTrainingSAE(TopKTrainingSAEConfig(k=d["k"], **kw)))
sae.load_state_dict(d["state"])
names = {f.name for f in dataclasses.fields(TrainStepInput)}
def step_input(x, dead, step):
    full = dict(sae_in=x, coefficients={"l1": d["l1"]} if arch == "standard" else {},
                dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False)
    return TrainStepInput(**{k: v for k, v in full.items() if k in names})
out = sae.training_forward_pass(step_input(d["x"][0], d["dead"], 0))
out.loss.backward()
grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
losses = {k: float(v) for k, v in out.losses.items()}
sae.load_state_dict(d["state"])
sae.zero_grad(set_to_none=True)
opt = torch.optim.Adam(sae.parameters(), lr=d["lr"], betas=(0.9, 0.999))
for i, x in enumerate(d["x"]):  # SAETrainer._train_step without autocast (CPU, float32)
    o = sae.training_forward_pass(step_input(x, None, i))
    o.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
torch.save({"grads": grads, "losses": losses, "state": sae.state_dict(),
            "version": md.version("sae-lens")}, sys.argv[3])
"""


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_rebuilt_step_equals_saelens(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    sae = PeerSAE(D_IN, D_SAE, arch, k=K, l1_coefficient=L1)
    with torch.no_grad():  # off the initial point: biases and unequal decoder norms matter
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    xs = torch.randn(STEPS, N, D_IN) * 2 + 0.3
    dead = torch.arange(D_SAE) % 5 == 0  # 20 dead latents: AuxK with scale 20 / (d_in // 2) capped at 1
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"d_in": D_IN, "d_sae": D_SAE, "k": K, "l1": L1, "lr": LR, "state": state,
                "x": xs, "dead": dead}, src)
    proc = subprocess.run([str(PYTHON), "-c", textwrap.dedent(SCRIPT), arch, str(src), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(out, weights_only=True)
    assert theirs["version"] == SAELENS_VERSION

    loss, _, terms = sae.losses(xs[0], dead)
    loss.backward()
    assert set(terms) == set(theirs["losses"])
    for name, value in terms.items():
        assert float(value.detach()) == pytest.approx(theirs["losses"][name], rel=1e-5), name
    if arch == "topk":
        assert float(terms["auxiliary_reconstruction_loss"].detach()) > 0
    for name, p in sae.named_parameters():
        close(p.grad, theirs["grads"][name])

    sae.load_state_dict(state)
    sae.zero_grad(set_to_none=True)
    trainer = PeerTrainer(sae, lr=LR, autocast=False)
    for x in xs:
        trainer.step(x)
    for name, value in sae.state_dict().items():
        close(value, theirs["state"][name])
    assert json.dumps(sorted(theirs["state"])) == json.dumps(sorted(state))
