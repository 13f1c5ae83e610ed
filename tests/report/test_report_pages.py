"""The report leads with the findings, and every latent page it links has its piano rolls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def test_findings_lead_and_every_page_has_piano_rolls(small_run: Path) -> None:
    index = (small_run / "report" / "index.html").read_text()
    assert "Findings that beat their controls" in index
    assert index.index("Findings that beat their controls") < index.index("Overview")
    findings = json.loads((small_run / "analyze" / "feature_token" / "findings.json").read_text())
    for hook, entry in findings["hooks"].items():
        assert f"{hook}: {len(entry['findings'])} findings" in index
    pages = sorted(set(re.findall(r'href="(latents/[^"]+\.html)"', index)))
    assert pages
    for page in pages:
        html = (small_run / "report" / page).read_text()
        pngs = re.findall(r'<img src="([^"]+\.png)"', html)
        assert pngs, f"{page} has no piano roll"
        assert all((small_run / "report" / page).parent.joinpath(p).exists() for p in pngs)


def test_a_plugin_analyzer_gets_its_own_section(small_run: Path) -> None:
    """``note_share`` of plugins/music-interpret-notestats: its summary.md, the summary its
    ``analyze`` returned and its files, in a section of its own."""
    folder = small_run / "analyze" / "note_share"
    if not folder.is_dir():
        pytest.skip("the notestats plugin is not installed (make init installs plugins/*)")
    index = (small_run / "report" / "index.html").read_text()
    section = index[index.index('id="an-note_share"'):]
    assert "Analysis: note_share" in index
    assert "most note-specific" in section
    hooks = json.loads((small_run / "manifest.json").read_text())["stages"]["analyze"]["summary"]
    for hook, entry in hooks["note_share"].items():
        assert f"{hook}.live_latents" in section and f"{hook}.json" in section
        assert entry["tokens"] > 0


def test_top_examples_render_the_findings_first(small_run: Path) -> None:
    findings = json.loads((small_run / "analyze" / "feature_token" / "findings.json").read_text())
    for hook, entry in findings["hooks"].items():
        index = json.loads((small_run / "analyze" / "top_examples" / hook / "index.json").read_text())
        reasons = [e.get("reason") for e in index["latents"]]
        found = [f["latent"] for f in entry["findings"]]
        assert [e["latent"] for e in index["latents"][: len(found)]] == found
        assert reasons[: len(found)] == ["finding"] * len(found)


def test_findings_table_shows_the_causal_verdict() -> None:
    from music_interpret.stages.report import _causal_cell, _findings_section, _steer_cell

    causal = {"latent": 7, "verdict": "used", "effect": 0.031, "ci": [0.012, 0.05],
              "controls": {"max": 0.004},
              "steering": [{"alpha_multiple": 2, "shift": 0.01, "ci": [0.0, 0.02]},
                           {"alpha_multiple": 8, "shift": 0.2, "ci": [0.1, 0.3]}]}
    assert _causal_cell(causal) == "used: 0.031 [0.012, 0.05] (controls max 0.004)"
    assert _steer_cell(causal) == "x8: 0.2 [0.1, 0.3]"
    assert _causal_cell(None) == "not tested"
    finding = {"latent": 7, "label": "next.position=6", "when": "t+1", "auroc": 0.95,
               "precision_mass": 0.8, "margin": 0.05, "density": 0.01, "strongest_control": "neuron",
               "controls": {"neuron": {"score": 0.9, "unit": "dim 3"}}}
    html = _findings_section({"rule": {"min_auroc": 0.9, "margin": 0.02, "min_precision": 0.5},
                              "hooks": {"h": {"summary": {"findings": 1}, "findings": [finding]}}},
                             {"h": [7]}, {"h": {7: causal}})
    assert "next.position=6" in html and "used: 0.031" in html and 'href="latents/h/7.html"' in html


def test_a_sweep_shows_the_analysed_member_and_the_curve(tmp_path: Path) -> None:
    from music_interpret.stages.report import _dictionary_section, _hook_data

    train = tmp_path / "train" / "dictionaries" / "h"
    for member in ("d_sae=4,seed=0", "d_sae=8,seed=0"):
        (train / member).mkdir(parents=True)
        (train / member / "config.json").write_text(json.dumps({"d_sae": int(member[6]), "hook_point": "h"}))
        (train / member / "metrics.json").write_text(json.dumps({"holdout": {"fvu": 0.5, "l0": 3.0}}))
    (train / "sweep.json").write_text(json.dumps({"curve": [{"member": "d_sae=4,seed=0", "l0": 3.0},
                                                            {"member": "d_sae=8,seed=0", "l0": 4.0}]}))
    analyze = tmp_path / "analyze"
    analyze.mkdir()
    (analyze / ".stage.json").write_text(json.dumps({"summary": {"sweep_members": {"h": "d_sae=8,seed=0"}}}))
    data = _hook_data("h", tmp_path / "train", analyze)
    assert data.member == "d_sae=8,seed=0" and data.config["d_sae"] == 8
    (tmp_path / "out" / "assets").mkdir(parents=True)
    html = _dictionary_section(data, tmp_path / "out", [])
    assert "Sweep (this page shows d_sae=8,seed=0)" in html and "holdout FVU" not in html
