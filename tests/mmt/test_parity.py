"""Parity of our MMT reimplementation with MMT + x-transformers 0.25.9 (fixture references).

Tolerance (from the fixture README): ``max|ours - ref| <= 1e-5 * max(1, max|ref|)`` for every
logits, ``resid_*`` and ``final_norm`` array, on real AND padded positions (padded queries
reproduce x-transformers' uniform attention); MMT's training loss to relative 1e-5;
greedy and seeded decoding exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.generate import generate
from music_interpret.adapters.mmt.loading import load_mmt
from music_interpret.adapters.mmt.model import Masking, hook_point_names, mmt_training_loss
from music_interpret.adapters.mmt.representation import encode_song
from music_interpret.interfaces import Batch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"
RUNS = ("ape-tiny", "rpe-tiny")
RTOL = 1e-5


def _close(ours: np.ndarray, ref: np.ndarray, where: np.ndarray) -> float:
    diff = float(np.abs(ours - ref)[where].max())
    assert diff <= RTOL * max(1.0, float(np.abs(ref).max())), diff
    return diff


@pytest.fixture(scope="module", params=RUNS)
def run(request):
    name = request.param
    model, args = load_mmt(FIXTURES / "models" / "bach" / name)
    ref = np.load(FIXTURES / "reference" / f"{name}.npz", allow_pickle=False)
    seq, mask = torch.from_numpy(ref["seq"]), torch.from_numpy(ref["mask"])
    names = hook_point_names(model.cfg.layers)
    with torch.no_grad():
        logits, acts = model.net.run(seq, mask, capture=names)
    return {
        "name": name,
        "model": model,
        "args": args,
        "ref": ref,
        "logits": logits,
        "acts": acts,
        "seq": seq,
        "mask": mask,
    }


def test_logits_match(run):
    ref, mask = run["ref"], run["ref"]["mask"]
    assert list(ref["n_tokens"]) == list(run["model"].cfg.n_tokens)
    for f, lg in enumerate(run["logits"]):
        _close(lg.numpy(), ref[f"logits_{f}"], mask)
        _close(lg.numpy(), ref[f"logits_{f}"], ~mask)


def test_residual_stream_and_final_norm_match(run):
    ref, mask = run["ref"], run["ref"]["mask"]
    layers = run["model"].cfg.layers
    assert len([k for k in ref.files if k.startswith("resid_pre_")]) == layers
    for name, act in run["acts"].items():
        key = name.replace(".", "_")
        _close(act.numpy(), ref[key], mask)
        _close(act.numpy(), ref[key], ~mask)
    # resid_pre of layer 0 is the embedding sum, bit for bit
    assert np.array_equal(run["acts"]["resid_pre.0"].numpy(), ref["resid_pre_0"])


def test_explicit_mask_path_matches(run, monkeypatch):
    """The general (non right-padded) masking path agrees with the reference too."""
    build = Masking.build
    monkeypatch.setattr(Masking, "build", staticmethod(lambda m, t: build(m, t, general=True)))
    assert Masking.build(run["mask"], 320).attn_mask is not None
    ref = run["ref"]
    with torch.no_grad():
        logits, acts = run["model"].net.run(run["seq"], run["mask"], capture=["final_norm"])
    everywhere = np.ones(ref["mask"].shape, bool)
    _close(acts["final_norm"].numpy(), ref["final_norm"], everywhere)
    for f, lg in enumerate(logits):
        _close(lg.numpy(), ref[f"logits_{f}"], everywhere)


def test_training_loss_matches(run):
    with torch.no_grad():
        loss, losses = mmt_training_loss(run["model"], run["seq"], run["mask"])
    ref = run["ref"]
    assert abs(float(loss) - float(ref["loss"])) <= RTOL * abs(float(ref["loss"]))
    ours = np.array([float(v) for v in losses])
    np.testing.assert_allclose(ours, ref["losses"], rtol=RTOL, atol=0)


def test_dataset_encoding_reproduces_reference_batch(run):
    ref = run["ref"]
    args = run["args"]
    for i, name in enumerate(ref["names"]):
        notes = np.load(FIXTURES / "data" / "bach" / "processed" / "notes" / f"{name}.npy")
        codes = encode_song(notes, args["max_beat"], args["max_seq_len"])
        n = int(ref["seq_len"][i])
        assert len(codes) == n
        assert np.array_equal(codes, ref["seq"][i, :n])
        assert not ref["seq"][i, n:].any()


def test_unpadded_song_matches_padded_batch(run):
    ref = run["ref"]
    n = int(ref["seq_len"][1])
    with torch.no_grad():
        alone, _ = run["model"].net.run(run["seq"][1:2, :n])
    for f, lg in enumerate(alone):
        _close(lg[0].numpy(), ref[f"logits_{f}"][1, :n], np.ones(n, bool))


def test_adapter_float64_matches_reference(run):
    adapter = MMTAdapter(MMTAdapter.Config(dtype="float64"))
    adapter.load(FIXTURES / "models" / "bach" / run["name"])
    ref, mask = run["ref"], run["ref"]["mask"]
    acts = adapter.run_with_hooks(Batch(run["seq"], run["mask"]), ["final_norm", "resid_mid.0"])
    assert acts["final_norm"].dtype == torch.float64
    _close(acts["final_norm"].numpy(), ref["final_norm"], mask)
    _close(acts["resid_mid.0"].numpy(), ref["resid_mid_0"], mask)


@pytest.fixture(scope="module")
def decoding():
    # 128 tiny forwards: one thread avoids OpenMP spin-waits on a busy machine (100x faster)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = load_mmt(FIXTURES / "models" / "bach" / "ape-tiny")
    yield model, np.load(FIXTURES / "reference" / "ape-tiny-generate.npz", allow_pickle=False)
    torch.set_num_threads(threads)


def test_greedy_decoding_matches(decoding):
    model, ref = decoding
    out = generate(
        model,
        torch.from_numpy(ref["prompt"]),
        int(ref["seq_len"]),
        eos_token=int(ref["eos_token"]),
        temperature=float(ref["temperature"]),
        filter_thres=float(ref["greedy_filter_thres"]),
    )
    assert np.array_equal(out.numpy(), ref["greedy"])


def test_seeded_sampling_matches(decoding):
    model, ref = decoding
    torch.manual_seed(int(ref["seed"]))
    out = generate(
        model,
        torch.from_numpy(ref["prompt"]),
        int(ref["seq_len"]),
        eos_token=int(ref["eos_token"]),
        filter_thres=float(ref["sampled_filter_thres"]),
    )
    assert np.array_equal(out.numpy(), ref["sampled"])
