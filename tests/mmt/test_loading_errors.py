"""load_mmt / MMTAdapter.load: every user mistake is a one-line UserError naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.loading import load_mmt
from music_interpret.errors import UserError

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "mmt" / "models" / "bach"


def _copy(tmp_path: Path, run: str = "ape-tiny") -> Path:
    dest = tmp_path / run
    shutil.copytree(MODELS / run, dest)
    return dest


def _edit_args(model_dir: Path, **changes) -> None:
    path = model_dir / "train-args.json"
    args = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            args.pop(key)
        else:
            args[key] = value
    path.write_text(json.dumps(args))


def _error(model_dir: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_mmt(model_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_loads_both_fixture_models():
    for run, layers in (("ape-tiny", 2), ("rpe-tiny", 3)):
        model, args = load_mmt(MODELS / run)
        assert model.cfg.layers == layers == args["layers"]
        assert not model.training
        assert (model.net.pos_emb is None) == (run == "rpe-tiny")


def test_missing_directory_and_files(tmp_path):
    assert "not found" in _error(tmp_path / "nope")
    model_dir = _copy(tmp_path)
    (model_dir / "checkpoints" / "best_model.pt").unlink()
    msg = _error(model_dir)
    assert "best_model.pt" in msg and "not found" in msg
    (model_dir / "train-args.json").unlink()
    msg = _error(model_dir)
    assert "train-args.json" in msg and "not found" in msg


def test_unreadable_json(tmp_path):
    model_dir = _copy(tmp_path)
    (model_dir / "train-args.json").write_text('{"dim": 64,')
    msg = _error(model_dir)
    assert "train-args.json" in msg and "JSON" in msg
    (model_dir / "train-args.json").write_text("[1, 2]")
    assert "JSON object" in _error(model_dir)


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"dim": None}, "missing key 'dim'"),
        ({"heads": "4"}, "heads='4'"),
        ({"layers": 0}, "layers=0"),
        ({"rel_pos_emb": "yes"}, "rel_pos_emb"),
        ({"dropout": 2}, "dropout=2"),
    ],
)
def test_bad_train_args(tmp_path, changes, word):
    model_dir = _copy(tmp_path)
    _edit_args(model_dir, **changes)
    msg = _error(model_dir)
    assert "train-args.json" in msg and word in msg


def test_extra_train_args_keys_are_tolerated(tmp_path):
    model_dir = _copy(tmp_path)
    _edit_args(model_dir, some_future_option=[1, 2], gpu=0)
    model, args = load_mmt(model_dir)
    assert args["some_future_option"] == [1, 2]


def test_checkpoint_of_other_variant(tmp_path):
    model_dir = _copy(tmp_path)
    shutil.copy(
        MODELS / "rpe-tiny" / "checkpoints" / "best_model.pt",
        model_dir / "checkpoints" / "best_model.pt",
    )
    msg = _error(model_dir)
    assert "best_model.pt" in msg
    assert "expected abs-pos MMT, 2 layers, dim 64, 4 heads" in msg
    assert "looks like rotary MMT, 3 layers, dim 64, 2 heads" in msg
    assert "missing: [decoder.net.pos_emb.emb.weight]" in msg
    assert "unexpected: [" in msg and "rotary_pos_emb.inv_freq" in msg


def test_rel_pos_emb_drops_absolute_embedding(tmp_path):
    model_dir = _copy(tmp_path, "rpe-tiny")
    _edit_args(model_dir, abs_pos_emb=True)  # MMT ignores it when rotary is on
    model, _ = load_mmt(model_dir)
    assert model.net.pos_emb is None


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"heads": 2}, "to_q.weight (256, 64) vs (128, 64)"),
        ({"max_beat": 128}, "token_emb.1.emb.weight (257, 64) vs (129, 64)"),
        ({"max_seq_len": 512}, "pos_emb.emb.weight (1024, 64) vs (512, 64)"),
    ],
)
def test_shape_mismatch(tmp_path, changes, word):
    model_dir = _copy(tmp_path)
    _edit_args(model_dir, **changes)
    msg = _error(model_dir)
    assert "best_model.pt" in msg and "shapes" in msg and word in msg


def test_corrupt_or_foreign_checkpoint(tmp_path):
    model_dir = _copy(tmp_path)
    ckpt = model_dir / "checkpoints" / "best_model.pt"
    ckpt.write_bytes(b"not a checkpoint")
    assert "cannot load checkpoint" in _error(model_dir)
    torch.save({"step": 3}, ckpt)
    assert "state_dict of tensors" in _error(model_dir)


def test_bad_dtype_and_device(tmp_path):
    assert "dtype='int64'" in _error(MODELS / "ape-tiny", dtype="int64")
    assert "dtype='float33'" in _error(MODELS / "ape-tiny", dtype="float33")
    assert "device='nowhere'" in _error(MODELS / "ape-tiny", device="nowhere")


def test_adapter_max_seq_len_option():
    adapter = MMTAdapter(MMTAdapter.Config(max_seq_len=2048))
    with pytest.raises(UserError, match="max_seq_len=2048 exceeds the 1024 learned positions"):
        adapter.load(MODELS / "ape-tiny")
    rotary = MMTAdapter(MMTAdapter.Config(max_seq_len=2048))
    rotary.load(MODELS / "rpe-tiny")  # rotary positions extrapolate
    assert rotary.max_seq_len == 2048
    with pytest.raises(UserError, match="max_seq_len=1"):
        MMTAdapter(MMTAdapter.Config(max_seq_len=1)).load(MODELS / "rpe-tiny")
