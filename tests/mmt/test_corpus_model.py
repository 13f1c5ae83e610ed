"""The committed corpus model ``models/music21/mmt-256``: it loads through the adapter, it
was early-stopped, and the README's table of its validation losses is its ``metrics.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.training import evals_without_progress

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "music21" / "mmt-256"
FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument", "total")

pytestmark = pytest.mark.skipif(not (MODEL / "checkpoints" / "best_model.pt").is_file(),
                                reason="models/music21/mmt-256 is not in this checkout")


def _json(name: str) -> dict:
    return json.loads((MODEL / name).read_text(encoding="utf-8"))


def test_the_corpus_model_loads_through_the_adapter() -> None:
    size = (MODEL / "checkpoints" / "best_model.pt").stat().st_size
    assert size <= 16 * 2**20 and size == _json("metrics.json")["best_model_bytes"]
    adapter = MMTAdapter()
    adapter.load(MODEL)
    args = _json("train-args.json")
    assert (args["dim"], args["layers"], args["heads"]) == (256, 6, 4)
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())  # float16 upcast
    codes = torch.as_tensor(np.load(REPO / "tests/fixtures/mmt/reference/ape-tiny.npz")["seq"])
    codes = codes[:, :256].clamp(max=args["max_beat"])
    with torch.no_grad():
        logits = adapter.model.net(codes)
    assert all(bool(torch.isfinite(t).all()) for t in logits)


def test_the_corpus_model_was_early_stopped_and_beats_its_baselines() -> None:
    m, args = _json("metrics.json"), _json("train-args.json")
    assert m["finished"] and m["stopped"].startswith("early stopping")
    assert evals_without_progress(m["history"], args.get("min_delta", 0.0)) >= args["patience"]
    best = min(m["history"], key=lambda h: h["valid"]["total"])
    assert m["best_step"] == best["step"]
    for field in FIELDS:
        assert m["valid_loss_per_field"][field] < m["bigram_tuned_baseline_per_field"][field]
    assert args["out_dir"] == "models/music21/mmt-256"


def test_the_readme_table_is_the_models_metrics() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("#### The corpus model: `models/music21/mmt-256`", 1)[1]
    section = section.split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in FIELDS:
            rows[cells[0]] = [float(c) for c in cells[1:]]
    assert set(rows) == set(FIELDS)
    m = _json("metrics.json")
    keys = ("unigram_baseline_per_field", "bigram_baseline_per_field",
            "bigram_tuned_baseline_per_field", "valid_loss_per_field")
    for field, quoted in rows.items():
        assert quoted == [round(m[k][field], 3) for k in keys], field
    steps = re.search(r"It ran ([\d,]+) steps", section)
    assert steps and int(steps.group(1).replace(",", "")) == m["steps"]
