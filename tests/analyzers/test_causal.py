"""The ``causal`` analyzer: a planted latent in a linear toy model, the statistics, and the
analyzer end to end on the MMT fixture model."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.adapters.mmt.labels import label_target
from music_interpret.analyzers.causal_data import build_data
from music_interpret.analyzers.causal_run import HookSettings, Target, run_on_data
from music_interpret.analyzers.causal_stats import Rule, select_controls, verdict
from music_interpret.analyzers.causal_steer import measurable, shift
from music_interpret.interfaces import Batch
from music_interpret.learners.dictionary import Dictionary

from ..conftest import FIXTURES
from .toy_linear import VOCAB, D, LinearToy, toy_windows

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
MODEL = FIXTURES / "mmt" / "models" / "bach" / "ape-tiny"
DATA = FIXTURES / "mmt" / "data" / "bach" / "processed"
HOOK = "resid_post.1"


def planted(device: str) -> tuple[LinearToy, Dictionary]:
    """Read-outs use coordinate 0 (latent 0) and 6, 7 (outside the dictionary: its error
    term); latents 1-5 lie along coordinates 1-5, the read-outs' null space."""
    g = torch.Generator().manual_seed(1)
    readout = {}
    for f, v in zip(FIELDS, VOCAB, strict=True):
        r = torch.zeros(D, v)
        r[0] = torch.randn(v, generator=g)
        r[6:] = torch.randn(2, v, generator=g)
        readout[f] = r
    readout["pitch"][0] = 0.0
    readout["pitch"][0, 2] = 3.0  # latent 0 raises pitch code 2
    sae = Dictionary(D, 6)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(6, D))
        sae.W_enc.copy_(torch.eye(6, D).T)
    return LinearToy(readout, device=device), sae.to(device)


def test_planted_latent_is_used_and_null_space_latents_are_not(device: str) -> None:
    adapter, sae = planted(device)
    data = build_data([(c, o, s, c[:, 0] == 3) for c, o, s in toy_windows(8, 48)],
                      [f"s{i}" for i in range(8)], 3,
                      notes_only_patch=False, tokens="notes")
    settings = HookSettings(n_controls=4, rule=Rule(min_firing=10, min_songs=3, min_controls=3,
                                                    bootstrap=200), steer_latents=0)
    targets = [Target(0, "next.toy=2"), Target(1, "next.toy=2"), Target(0, "toy=2")]
    result = run_on_data(adapter, "h", sae, data, targets, {0, 1}, settings)
    used, null, by_field = result["latents"]
    assert used["effect_kind"] == "label_prob_drop" and by_field["effect_kind"] == "delta_ce_fire:pitch"
    assert set(used["controls"]["latents"]) == {2, 3, 4, 5}
    assert used["controls"]["effects"] == [0.0] * 4 and used["controls"]["max"] == 0.0
    assert used["effect"] > 0.01 and used["ci"][0] > 0 and used["verdict"] == "used"
    assert null["effect"] == 0.0 and null["ci"] == [0.0, 0.0] and null["verdict"] == "not used"
    assert null["kl_fire"]["total"] == 0.0 and null["delta_ce_all"]["total"] == 0.0
    assert used["kl_fire"]["total"] > 0 and used["firing_songs"] == 8
    for c in result["controls"].values():
        assert c["delta_ce_all"]["total"] == 0.0 and c["kl_fire"]["total"] == 0.0
    # by hand: remove x_0's positive part, the rest (coordinates 6, 7 included) stays
    drops, n = 0.0, 0
    for codes, _, _ in toy_windows(8, 48):
        x = adapter.run_with_hooks(Batch(torch.from_numpy(codes)[None], None), ["h"])["h"][0]
        ablated = x.clone()
        ablated[:, 0] = torch.clamp(x[:, 0], max=0.0)
        p = torch.softmax(x @ adapter.readout["pitch"], -1)[:-1, 2]
        q = torch.softmax(ablated @ adapter.readout["pitch"], -1)[:-1, 2]
        fire = x[:-1, 0] > 0
        drops += float((p - q)[fire].sum())
        n += int(fire.sum())
    assert used["firing_positions"] == n
    assert used["effect"] == pytest.approx(drops / n, rel=1e-5)
    assert used["dp_label"] == pytest.approx(-drops / n, rel=1e-5)


def test_controls_are_density_matched_and_skip_findings() -> None:
    density = np.array([0.1, 0.01, 0.09, 0.2, 0.5, 0.11, 0.0])
    usable = density > 0
    assert select_controls(density, 0, {1, 5}, usable, 2, seed=0) == [2, 3]
    assert 6 not in select_controls(density, 0, set(), usable, 10, seed=0)
    assert select_controls(density, 0, set(), usable, 0, seed=0) == []


def test_verdict_rule() -> None:
    rule = Rule(min_firing=10, min_songs=2, min_controls=2)
    assert verdict(0.5, [0.1, 0.9], [0.1, 0.2], 50, 3, rule) == "used"
    assert verdict(0.5, [-0.1, 0.9], [0.1, 0.2], 50, 3, rule) == "not used"
    assert verdict(0.15, [0.1, 0.2], [0.1, 0.2], 50, 3, rule) == "not used"
    assert verdict(0.5, [0.1, 0.9], [0.1, 0.2], 5, 3, rule) == "insufficient"
    assert verdict(0.5, [0.1, 0.9], [0.1, 0.2], 50, 1, rule) == "insufficient"
    assert verdict(0.5, [0.1, 0.9], [0.1, float("nan")], 50, 3, rule) == "insufficient"


def test_mmt_label_targets() -> None:
    field, codes = label_target("next.pitch_class", "C")
    assert field == "pitch" and codes == [p + 1 for p in range(0, 128, 12)]
    assert label_target("next.pitch", "C4") == ("pitch", [61])
    assert label_target("next.octave", "4")[1] == [p + 1 for p in range(60, 72)]
    assert label_target("next.position", "6") == ("position", [7])
    assert label_target("next.duration", "1/2") == ("duration", [6])
    assert label_target("next.instrument", "violin")[0] == "instrument"
    assert label_target("next.event_type", "end-of-song") == ("type", [4])
    assert label_target("pitch_class", "C") == ("pitch", None)
    assert label_target("next.key", "C major") == ("pitch", None)
    assert label_target("metric_strength", "downbeat") == ("position", None)
    with pytest.raises(KeyError):
        label_target("next.pitch_class", "H")


def test_steering_shift_and_interval() -> None:
    assert measurable("next.pitch_class=C") and measurable("position=6")
    assert not measurable("next.toy=2") and not measurable("")
    base = (np.array([1.0, 1.0, 2.0, 0.0]), np.array([10.0, 10.0, 10.0, 10.0]))
    steered = (np.array([5.0, 4.0, 6.0, 5.0]), np.array([10.0, 10.0, 10.0, 10.0]))
    out = shift(base, steered, 500, seed=0)
    assert out["share_unsteered"] == pytest.approx(0.1) and out["share_steered"] == pytest.approx(0.5)
    assert out["shift"] == pytest.approx(0.4) and 0.3 <= out["ci"][0] <= 0.4 <= out["ci"][1] <= 0.5


# -- end to end on the MMT fixture ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """extract -> train -> analyze (feature_token, causal) on 8 fixture songs, half held out."""
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import PluginRegistry

    tmp = tmp_path_factory.mktemp("causal")
    path = tmp / "p.yaml"
    path.write_text(textwrap.dedent(f"""
        run: causal
        output_dir: {tmp / 'reports'}
        device: cpu
        stages: [extract, train, analyze]
        model: {{path: {MODEL}}}
        data: {{path: {DATA}}}
        extract: {{layers: [1], max_songs: 8, output: {tmp / 'acts'}}}
        train:
          learner: {{name: relu_l1, d_sae: 64, lr: 0.003, batch_size: 256}}
          steps: 30
          holdout_fraction: 0.5
          downstream: off
        analyze:
          analyzers:
            - {{name: feature_token, attributes: [next.pitch_class], controls: [neuron]}}
            - {{name: causal, steer_latents: 0}}
    """))
    reg = PluginRegistry()
    pipeline = load_pipeline(path, reg)
    Engine(pipeline, reg, log=lambda msg: None).run()
    return pipeline.run_dir


def test_analyze_stage_runs_causal_after_feature_token(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    analyze = json.dumps(manifest)
    assert '"causal"' in analyze
    out = trained / "analyze" / "causal"
    result = json.loads((out / f"{HOOK}.json").read_text())
    findings = json.loads((trained / "analyze" / "feature_token" / "findings.json").read_text())
    assert [r["latent"] for r in result["latents"]] == [
        f["latent"] for f in findings["hooks"][HOOK]["findings"]][:32]
    assert len(result["songs"]) >= 3 and (out / "summary.md").is_file()


def context(trained: Path, out: Path, device: str) -> object:
    from music_interpret.adapters.mmt.adapter import MMTAdapterConfig
    from music_interpret.analyzers.context import AnalysisContext
    from music_interpret.config import PluginRef
    from music_interpret.plugins import PluginRegistry

    return AnalysisContext(store_path=trained.parent.parent / "acts",
                           dictionaries={HOOK: trained / "train" / "dictionaries" / HOOK},
                           out_dir=out, model_dir=MODEL, data_dir=DATA, device=device,
                           model_adapter=PluginRef("model_adapter", "mmt", MMTAdapterConfig()),
                           registry=PluginRegistry())


def test_without_feature_token_the_most_active_latents_are_tested(trained: Path,
                                                                   tmp_path: Path) -> None:
    from music_interpret.analyzers.causal import CausalAnalyzer, CausalConfig

    cfg = CausalConfig(fallback_top=2, n_controls=3, bootstrap=50, steer_latents=0)
    summary = CausalAnalyzer(cfg).analyze(context(trained, tmp_path / "causal", "cpu"))
    s = summary["hooks"][HOOK]
    assert s["tested"] == 2 and s["targets_from"].startswith("activation")
    rows = json.loads((tmp_path / "causal" / f"{HOOK}.json").read_text())["latents"]
    assert [r["effect_kind"] for r in rows] == ["delta_ce_fire:total"] * 2
    assert all(r["source"] == "activation" and r["label"] == "" for r in rows)


def test_causal_on_the_fixture_model(trained: Path, tmp_path: Path, device: str) -> None:
    """Findings given in findings.json: ablation, controls, intervals, steering, outputs."""
    from music_interpret.analyzers.causal import CausalAnalyzer, CausalConfig

    folder = trained / "train" / "dictionaries" / HOOK
    held = json.loads((folder / "config.json").read_text())["training"]["holdout_songs"]
    (tmp_path / "feature_token").mkdir()
    (tmp_path / "feature_token" / "findings.json").write_text(json.dumps({"rule": {"tokens": "notes"}, "hooks": {HOOK: {"findings": [
        {"latent": 3, "label": "next.pitch_class=D", "when": "t+1"},
        {"latent": 7, "label": "position=6", "when": "t"}]}}}))
    ctx = context(trained, tmp_path / "causal", device)
    cfg = CausalConfig(n_controls=4, min_firing=5, min_songs=3, bootstrap=200, steer_latents=1, steer_prompts=2,
                       steer_seeds=2, steer_steps=8, alphas=[4.0])
    summary = CausalAnalyzer(cfg).analyze(ctx)
    assert summary["hooks"][HOOK]["tested"] == 2
    result = json.loads((tmp_path / "causal" / f"{HOOK}.json").read_text())
    assert result["songs"] == [s for s in held if s in result["songs"]] and len(result["songs"]) >= 3
    pc, pos = result["latents"]
    assert pc["effect_kind"] == "label_prob_drop" and 0 < pc["p_label_clean"] < 1
    assert pos["effect_kind"] == "delta_ce_fire:position" and pos["p_label_clean"] is None
    for r in (pc, pos):
        assert r["verdict"] in ("used", "not used", "insufficient")
        assert not {3, 7} & set(r["controls"]["latents"]) and len(r["controls"]["latents"]) <= 4
        assert r["kl_fire"]["total"] is None or r["kl_fire"]["total"] >= 0
        if r["firing_songs"] >= 2:
            assert r["ci"][0] <= r["effect"] <= r["ci"][1]
    steer = (pc["steering"] or pos["steering"])
    assert steer is not None and steer[0]["alpha_multiple"] == 4.0 and steer[0]["pairs"] == 4
    with open(tmp_path / "causal" / f"{HOOK}_causal.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["latent"] for r in rows] == ["3", "7"] and "steer_shift_x4" in rows[0]
    assert "| 3 | next.pitch_class=D |" in (tmp_path / "causal" / "summary.md").read_text()


def test_generation_with_a_patch_is_seeded(device: str) -> None:
    from music_interpret.adapters.mmt.adapter import MMTAdapter
    from music_interpret.adapters.mmt.dataset import open_dataset

    adapter = MMTAdapter()
    adapter.load(MODEL, device=device)
    ds = open_dataset(DATA)
    prompt = adapter.windows(ds.read(ds.names[0]))[1][0].codes[:20]
    a = adapter.generate(prompt, 12, seed=5)
    assert np.array_equal(a, adapter.generate(prompt, 12, seed=5))
    push = torch.zeros(adapter.d_model, device=device)
    same = adapter.generate(prompt, 12, seed=5, patch=(HOOK, lambda x: x + push))
    assert np.array_equal(a, same)
    push = 20.0 * torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)).to(device)
    far = adapter.generate(prompt, 12, seed=5, patch=(HOOK, lambda x: x + push))
    assert not np.array_equal(a, far)
