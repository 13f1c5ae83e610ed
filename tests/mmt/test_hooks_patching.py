"""MMTAdapter hook points, activation capture, patching losses and plugin registration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.model import FIELDS, mmt_training_loss
from music_interpret.errors import UserError
from music_interpret.interfaces import Batch, ModelAdapter

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"


@pytest.fixture(scope="module", params=["ape-tiny", "rpe-tiny"])
def loaded(request):
    adapter = MMTAdapter()
    adapter.load(FIXTURES / "models" / "bach" / request.param)
    ref = np.load(FIXTURES / "reference" / f"{request.param}.npz", allow_pickle=False)
    batch = Batch(
        torch.from_numpy(ref["seq"]),
        torch.from_numpy(ref["mask"]),
        song=[0, 1, 2],
        offset=[0, 0, 0],
    )
    return adapter, ref, batch


def _softmax_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, target[..., None], -1)[..., 0]


def test_adapter_contract(loaded):
    adapter, ref, _ = loaded
    assert isinstance(adapter, ModelAdapter) and MMTAdapter.name == "mmt"
    n = adapter.n_layers
    assert adapter.hook_points()[:3] == ["resid_pre.0", "resid_mid.0", "resid_post.0"]
    assert adapter.hook_points()[-1] == "final_norm" and len(adapter.hook_points()) == 3 * n + 1
    assert adapter.d_model == 64 and adapter.max_seq_len == 1024 and adapter.max_beat == 256
    assert adapter.train_args["layers"] == n
    assert len(adapter.checkpoint_sha256) == 64


def test_run_with_hooks_matches_reference(loaded):
    adapter, ref, batch = loaded
    mask = ref["mask"]
    acts = adapter.run_with_hooks(batch, adapter.hook_points())
    assert set(acts) == set(adapter.hook_points())
    for name, act in acts.items():
        assert act.shape == (3, 320, 64) and not act.requires_grad
        r = ref[name.replace(".", "_")]
        assert np.abs(act.numpy() - r)[mask].max() <= 1e-5 * max(1.0, np.abs(r).max())


def test_early_stop_skips_later_layers(loaded):
    adapter, ref, batch = loaded
    calls = []
    handle = adapter.model.net.norm.register_forward_hook(lambda *a: calls.append(1))
    last_ff = adapter.model.net.attn_layers.layers[-1][1]
    handle2 = last_ff.register_forward_hook(lambda *a: calls.append(2))
    try:
        acts = adapter.run_with_hooks(batch, ["resid_mid.0"])
        assert calls == [] and list(acts) == ["resid_mid.0"]
        adapter.run_with_hooks(batch, ["final_norm"])
        assert calls == [2, 1]
    finally:
        handle.remove()
        handle2.remove()
    full = adapter.run_with_hooks(batch, adapter.hook_points())
    assert torch.equal(acts["resid_mid.0"], full["resid_mid.0"])


def test_identity_patch_gives_clean_losses_over_real_targets(loaded):
    adapter, ref, batch = loaded
    losses = adapter.run_with_patch(batch, "resid_mid.0", lambda x: x)
    assert list(losses) == [*FIELDS, "total"]
    keep = ref["mask"][:, 1:]
    for f, name in enumerate(FIELDS):
        ce = _softmax_ce(ref[f"logits_{f}"][:, :-1], ref["seq"][:, 1:, f])
        expected = ce[keep].mean()
        assert abs(float(losses[name]) - expected) <= 1e-5 * expected
    total = sum(float(losses[n]) for n in FIELDS)
    assert float(losses["total"]) == pytest.approx(total, rel=1e-6)
    # MMT's training loss also averages over padding targets, so it differs
    with torch.no_grad():
        mmt_loss, _ = mmt_training_loss(adapter.model, batch.codes, batch.mask)
    assert abs(float(mmt_loss) - float(losses["total"])) > 0.1


def test_patch_changes_downstream_only(loaded):
    adapter, _, batch = loaded
    clean = adapter.run_with_patch(batch, "final_norm", lambda x: x)
    zero = adapter.run_with_patch(batch, "final_norm", torch.zeros_like)
    # with a zero stream each head outputs its bias
    heads = adapter.model.net.to_logits
    keep = batch.mask[:, 1:]
    for f, name in enumerate(FIELDS):
        logits = heads[f].bias.detach().expand(int(keep.sum()), -1)
        target = batch.codes[:, 1:, f][keep]
        expected = torch.nn.functional.cross_entropy(logits, target)
        assert torch.allclose(zero[name], expected, rtol=1e-6)
    assert float(zero["total"]) > float(clean["total"])
    seen = {}

    def spy(x):
        seen["shape"] = tuple(x.shape)
        return x * 0.5

    halved = adapter.run_with_patch(batch, "resid_pre.0", spy)
    assert seen["shape"] == (3, 320, 64)
    assert float(halved["total"]) != pytest.approx(float(clean["total"]))


def test_patching_padding_does_not_change_loss(loaded):
    adapter, ref, batch = loaded
    n = int(ref["seq_len"][1])
    alone = adapter.run_with_patch(
        Batch(batch.codes[1:2, :n], batch.mask[1:2, :n]), "resid_post.0", lambda x: x
    )
    padded = adapter.run_with_patch(
        Batch(batch.codes[1:2], batch.mask[1:2]), "resid_post.0", lambda x: x
    )
    for name in alone:
        assert float(alone[name]) == pytest.approx(float(padded[name]), rel=1e-5)


def test_user_errors(loaded):
    adapter, _, batch = loaded
    with pytest.raises(UserError, match="unknown hook point.*resid_pre.9.*available: resid_pre.0"):
        adapter.run_with_hooks(batch, ["resid_pre.9"])
    with pytest.raises(UserError, match="unknown hook point"):
        adapter.run_with_patch(batch, "attn.0", lambda x: x)
    with pytest.raises(UserError, match="returned \\(3, 320\\)"):
        adapter.run_with_patch(batch, "resid_mid.0", lambda x: x[..., 0])
    codes = batch.codes.clone()
    codes[0, 10, 1] = 300  # beat code beyond max_beat + 1 = 257
    with pytest.raises(UserError, match="code 300 of field beat"):
        adapter.run_with_hooks(Batch(codes, batch.mask), ["final_norm"])
    with pytest.raises(UserError, match="sequence length 1025"):
        adapter.run_with_hooks(
            Batch(torch.zeros(1, 1025, 6, dtype=torch.long), torch.ones(1, 1025, dtype=torch.bool)),
            ["final_norm"],
        )
    with pytest.raises(UserError, match="mask shape"):
        adapter.run_with_hooks(Batch(batch.codes, batch.mask[:, :5]), ["final_norm"])


def test_encode_and_metadata(loaded):
    adapter, ref, _ = loaded
    notes = np.load(FIXTURES / "data" / "bach" / "processed" / "notes" / "bwv302.npy")
    codes = adapter.encode(notes, max_seq_len=1024)
    assert np.array_equal(codes, ref["seq"][2])
    meta = adapter.token_metadata(codes)
    assert len(meta["beat"]) == 320 and meta["beat"].max() < adapter.max_beat


def test_plugin_registers_adapter_without_importing_torch():
    code = (
        "import sys\n"
        "from music_interpret.adapters.mmt import plugin\n"
        "from music_interpret.adapters.mmt.adapter import MMTAdapter\n"
        "assert plugin.mi_model_adapters() == [MMTAdapter]\n"
        "assert MMTAdapter.name == 'mmt' and MMTAdapter.Config().dtype == 'float32'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
