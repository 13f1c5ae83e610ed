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


def test_counting_parameters_builds_nothing_and_loads_no_compiler() -> None:
    """describe/validate count a model's parameters on the meta device; the embeddings'
    init there must not pull in torch._dynamo (seconds of imports for every CLI call)."""
    import subprocess
    import sys

    code = ("import json, sys, torch\n"
            "from music_interpret.adapters.mmt.loading import config_from_args, count_parameters\n"
            "from music_interpret.adapters.mmt.model import MMTModel\n"
            "args = {'dim': 64, 'layers': 2, 'heads': 4, 'max_seq_len': 128, 'max_beat': 64,\n"
            "        'abs_pos_emb': True, 'rel_pos_emb': False}\n"
            "n = count_parameters(config_from_args(args))\n"
            "print(n, 'torch._dynamo' in sys.modules)\n"
            "torch.manual_seed(0); m = MMTModel(config_from_args(args))\n"
            "print(sum(t.numel() for t in m.state_dict().values()), float(m.state_dict()[next(\n"
            "    k for k in m.state_dict() if 'emb' in k)].std()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.split("\n")[:2]
    n, loaded = first.split()
    total, std = second.split()
    assert n == total and loaded == "False"
    assert float(std) > 0.1  # embeddings built afterwards are initialised as always
