"""The random-init stand-in model loads through the adapter with the requested shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.init_model import init_model, main
from music_interpret.errors import UserError


def test_random_init_model_loads(tmp_path: Path) -> None:
    out = init_model(tmp_path / "m", dim=64, layers=2, heads=1, max_seq_len=256, max_beat=64)
    adapter = MMTAdapter()
    adapter.load(out)
    assert adapter.d_model == 64 and adapter.n_layers == 2 and adapter.max_beat == 64
    assert adapter.train_args["dataset"] == "random-init"
    with pytest.raises(UserError, match="exists; refusing to replace it"):
        init_model(out, dim=64, layers=2, heads=1, max_seq_len=256, max_beat=64)
    assert main([str(out), "--dim", "64"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
