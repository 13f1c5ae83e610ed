"""dictionary_compare: splitting and cross-seed stability on planted decoder rows; the analyze
stage finds a sweep's members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.analyzers.context import AnalysisContext
from music_interpret.analyzers.dictionary_compare import CompareConfig, DictionaryCompareAnalyzer
from music_interpret.errors import UserError
from music_interpret.learners.dictionary import Dictionary
from music_interpret.learners.io import save_dictionary
from music_interpret.stages.analyze import choose_member, find_dictionaries

from . import D_MODEL, HOOK, planted_store


def unit(*parts: tuple[int, float]) -> np.ndarray:
    v = np.zeros(D_MODEL)
    for i, x in parts:
        v[i] = x
    return v / np.linalg.norm(v)


SMALL = [unit((0, 1)), unit((1, 1)), unit((2, 1)), unit((3, 1))]
LARGE = [unit((0, 1), (4, 0.3)), unit((0, 1), (4, -0.3)),  # e0 splits in two
         unit((1, 1), (12, 0.05)),  # e1 is kept
         unit((2, 1), (5, 0.5)), unit((2, 1), (5, -0.5)), unit((2, 1), (6, 0.5)),  # e2: three
         unit((7, 1)), unit((8, 1))]  # e3 has no child
OTHER_SEED = [unit((0, 1)), unit((1, 1)), unit((2, 1), (3, 1)), unit((8, 1))]


def save(folder: Path, rows: list[np.ndarray]) -> Path:
    w = torch.tensor(np.array(rows), dtype=torch.float32)
    model = Dictionary(D_MODEL, len(rows), apply_b_dec_to_input=False)
    with torch.no_grad():
        model.W_dec.copy_(w)
        model.W_enc.copy_(w.T)
    return save_dictionary(folder, model, {"hook_point": HOOK})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    store = planted_store(tmp / "store", songs=4, notes=60)
    root = tmp / "train" / "dictionaries"
    for label, rows in (("d_sae=4,seed=0", SMALL), ("d_sae=4,seed=1", OTHER_SEED),
                        ("d_sae=8,seed=0", LARGE)):
        save(root / HOOK / label, rows)
    (root / HOOK / "sweep.json").write_text(json.dumps({"members": [
        {"label": n} for n in ("d_sae=4,seed=0", "d_sae=4,seed=1", "d_sae=8,seed=0")]}))
    return store, tmp / "train"


def test_splitting_and_stability_on_planted_rows(sweep: tuple[Path, Path], tmp_path: Path,
                                                 device: str) -> None:
    store, train = sweep
    _, members = find_dictionaries(train / "dictionaries")
    ctx = AnalysisContext(store_path=store, dictionaries={HOOK: members[HOOK]["d_sae=4,seed=0"]},
                          out_dir=tmp_path, train_dir=train, device=device)  # members via train_dir
    DictionaryCompareAnalyzer(CompareConfig(split_threshold=0.5)).analyze(ctx)
    result = json.loads((tmp_path / "compare.json").read_text())["hooks"][HOOK]
    assert result["members"]["d_sae=8,seed=0"] == {"d_sae": 8, "live": 8}
    (split,) = result["splitting"]
    assert (split["smaller"], split["larger"]) == ("d_sae=4,seed=0", "d_sae=8,seed=0")
    assert (split["unmatched"], split["kept"], split["split"]) == (1, 1, 2)
    assert split["mean_children_of_split"] == 2.5 and split["max_children"] == 3
    assert split["control_random"]["split"] == 0
    # the larger dictionary's own clusters: {0, 1} and {3, 4, 5} lie above 0.5 of each other
    assert split["mean_children"] == 1.5 and split["control_within_larger_mean"] == 1.0
    rows = (tmp_path / f"{HOOK}_splitting.csv").read_text().splitlines()
    assert rows[0] == "smaller,larger,latent,n_children,children,best_cos" and len(rows) == 5
    stab = {(p["a"], p["b"]): p for p in result["stability"]}
    one_to_zero = stab[("d_sae=4,seed=1", "d_sae=4,seed=0")]
    assert one_to_zero["share_above"] == {"0.7": 0.75, "0.9": 0.5}
    assert one_to_zero["control_random"]["0.9"] < 0.5
    assert "| d_sae=4,seed=0 | d_sae=8,seed=0 | 4 | 1 | 1 | 2 |" in (tmp_path / "summary.md").read_text()


def test_analyze_stage_finds_sweep_members(sweep: tuple[Path, Path]) -> None:
    _, train = sweep
    single, sweeps = find_dictionaries(train / "dictionaries")
    assert single == {} and list(sweeps[HOOK]) == ["d_sae=4,seed=0", "d_sae=4,seed=1",
                                                   "d_sae=8,seed=0"]
    assert choose_member(sweeps[HOOK], None, HOOK).name == "d_sae=4,seed=0"
    assert choose_member(sweeps[HOOK], "d_sae=8", HOOK).name == "d_sae=8,seed=0"
    assert choose_member(sweeps[HOOK], "seed=1,d_sae=4", HOOK).name == "d_sae=4,seed=1"
    with pytest.raises(UserError, match="no member of the sweep"):
        choose_member(sweeps[HOOK], "d_sae=16", HOOK)
