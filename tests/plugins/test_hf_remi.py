"""The second model adapter, ``hf_remi`` (plugins/music-interpret-hf-remi): a HuggingFace
causal LM over MidiTok REMI tokens runs the whole chain of ``pipelines/hf-remi.yaml``
(extract, preprocess, train, analyze, report) with its own token attributes.

Nothing is installed here: ``make init`` installs every package under ``plugins/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("transformers", reason="transformers is not installed (make init installs plugins/*)")
pytest.importorskip("miditok", reason="miditok is not installed (make init installs plugins/*)")

MODEL = REPO / "models" / "bach" / "hf-remi"
DATA = REPO / "data" / "base" / "bach_notes"
PIPELINE = REPO / "pipelines" / "hf-remi.yaml"
HOOK = "resid_post.1"


def _registry() -> Any:
    from music_interpret.plugins import PluginRegistry

    registry = PluginRegistry()
    if registry.find("model_adapter", "hf_remi") is None:
        pytest.skip("the hf_remi plugin is not installed (make init installs plugins/*)")
    return registry


@pytest.fixture(scope="module")
def adapter() -> Any:
    cls = _registry().find("model_adapter", "hf_remi")
    out = cls(cls.Config())
    out.load(MODEL, "cpu")
    return out


def test_tokens_render_back_to_the_songs_notes(adapter: Any) -> None:
    dataset = adapter.open_dataset(DATA, "valid")
    notes = dataset.read(dataset.names[0])
    tokens = adapter.tokenize(notes)
    vocabulary = adapter.event_vocabulary()
    events = np.asarray(tokens.coords["event_type"])
    assert vocabulary.events[events[0]] == "BOS" and events[-1] == vocabulary.end
    assert tokens.dropped == 0 and int((events == vocabulary.note).sum()) == len(notes)
    table = adapter.render_notes(tokens)
    got = np.stack([table.beat, table.position, table.pitch, table.duration, table.program], 1)
    order = lambda x: x[np.lexsort((x[:, 2], x[:, 4], x[:, 1], x[:, 0]))]  # noqa: E731
    assert np.array_equal(order(got), order(notes))
    # windows own every token once, and the input embedding is rebuilt from coordinates
    windows = adapter.song_windows(tokens)
    owned = np.concatenate([w.token[w.owned] for w in windows])
    assert np.array_equal(np.sort(owned), np.arange(len(tokens)))
    rows, _ = adapter.embed_coordinates(tokens.coords)
    names, weight = adapter.input_embeddings()
    assert np.allclose(rows, weight.numpy()[tokens.inputs]) and "pitch=C4" in names


def test_hook_points_and_patching(adapter: Any) -> None:
    import torch

    dataset = adapter.open_dataset(DATA, "test")
    tokens = adapter.tokenize(dataset.read(dataset.names[0]))
    batch = adapter.pad([w.inputs for w in adapter.song_windows(tokens)][:2])
    acts = adapter.run_with_hooks(batch, ["resid_post.0", "resid_pre.1", HOOK])
    assert torch.equal(acts["resid_post.0"], acts["resid_pre.1"])
    assert acts[HOOK].shape == (*batch.codes.shape, adapter.d_model)
    clean = adapter.patched_logits(batch, HOOK)["token"]
    assert torch.allclose(clean, adapter.patched_logits(batch, HOOK, lambda x: x)["token"])
    losses = adapter.run_with_patch(batch, HOOK, lambda x: x)
    ablated = adapter.run_with_patch(batch, "resid_pre.1", torch.zeros_like)
    assert float(losses["total"]) < float(ablated["total"]) and float(losses["total"]) < 2.5
    # what t+1 means: the next token; a Program token's next.pitch is predicted directly
    assert adapter.label_target("next.pitch", "C4") == ("token", [adapter.vocab.token_id("Pitch", 60)])
    assert adapter.label_target("next.duration", "1/2") == ("token", None)
    new = adapter.generate(tokens.inputs[:30], 12, seed=3)
    assert np.array_equal(new, adapter.generate(tokens.inputs[:30], 12, seed=3)) and len(new) > 0


def _pipeline(tmp: Path) -> Path:
    """``pipelines/hf-remi.yaml`` on six songs, with few dictionary steps and light analyzers."""
    raw = yaml.safe_load(PIPELINE.read_text())
    raw.update(output_dir=str(tmp / "reports"), device="cpu")
    raw["model"]["path"], raw["data"]["path"] = str(MODEL), str(DATA)
    raw["extract"].update(max_songs=6, output=str(tmp / "acts"), forward_workers=2)  # threads share the model
    raw["train"].update(steps=60, downstream_windows=8)
    raw["train"]["learner"].update(d_sae=128, batch_size=256, lr=3e-3)
    light = {"causal": {"max_latents": 3, "fallback_top": 3, "steer_prompts": 1, "steer_seeds": 1,
                        "steer_steps": 8, "bootstrap": 20},
             "probe": {"bootstrap": 10, "ks": [1], "attributes": ["pitch_class", "event_type"]},
             "top_examples": {"render_latents": 3, "render_sample": 1, "n_examples": 3,
                              "render_examples": 1}}
    raw["analyze"]["analyzers"] = [{"name": a, **light[a]} if a in light else a
                                   for a in raw["analyze"]["analyzers"]]
    raw["report"].update(max_latent_pages=4, sample_rest=1)
    path = tmp / "hf-remi.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_whole_chain_runs_with_remi_tokens(tmp_path: Path) -> None:
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugin import open_store

    registry = _registry()
    pipeline = load_pipeline(_pipeline(tmp_path), registry)
    Engine(pipeline, registry, log=lambda msg: None).run()
    run = pipeline.run_dir

    store = open_store(tmp_path / "acts")
    assert store.hooks == ["resid_pre.0", HOOK] and store.d_model == 128 and len(store.songs) == 6
    assert store.attrs["model_adapter"] == "hf_remi"
    vocabulary = store.vocabulary
    assert vocabulary.events[vocabulary.note] == "Pitch" and "Position" in vocabulary.events
    ds = store.open_dataset()
    try:
        events = ds["event_type"].values
        pitch = ds["pitch"].values
        assert set(np.unique(events)) >= {vocabulary.event_code(e) for e in ("Bar", "Position", "Pitch")}
        assert (pitch[events == vocabulary.note] >= 21).all() and (pitch[events != vocabulary.note] == -1).all()
        assert int((ds["instrument"].values > 0).sum()) > 0
    finally:
        ds.close()

    folder = run / "train" / "dictionaries" / HOOK
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (folder / "weights.safetensors").is_file() and metrics["holdout"]["fvu"] < 1
    assert set(metrics["downstream"]["clean"]) == {"token", "total"}

    analyze = run / "analyze"
    assert (analyze / "feature_token" / f"{HOOK}.nc").is_file()
    findings = json.loads((analyze / "feature_token" / "findings.json").read_text())
    assert HOOK in findings["hooks"]
    assert (analyze / "probe" / "probe.nc").is_file()
    index = json.loads((analyze / "top_examples" / HOOK / "index.json").read_text())
    assert index["latents"] and list((analyze / "top_examples" / HOOK).glob("*.mid"))
    causal = json.loads((analyze / "causal" / f"{HOOK}.json").read_text())
    assert "summary" in causal
    html = (run / "report" / "index.html").read_text()
    assert f"Dictionary {HOOK}" in html and "Linear probes" in html and "Analysis: causal" in html


def test_causal_ablation_and_steering_read_the_token_field(adapter: Any, tmp_path: Path) -> None:
    """The causal analyzer's ablations on this model (the chain's feature_token rarely finds
    findings in a tiny run, so the latents are given): effects per ``token`` field, the
    label's probability from ``label_target``, steering through ``generate``."""
    from music_interpret.analyzers.causal import CausalConfig
    from music_interpret.analyzers.causal_run import HookSettings, Target, causal_hook
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.learners.io import load_dictionary
    from music_interpret.plugin import open_store

    registry = _registry()
    path = _pipeline(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = ["extract", "preprocess", "train"]
    raw["train"]["downstream"] = "off"
    path.write_text(yaml.safe_dump(raw))
    pipeline = load_pipeline(path, registry)
    Engine(pipeline, registry, log=lambda msg: None).run()
    dictionary = load_dictionary(pipeline.run_dir / "train" / "dictionaries" / HOOK)
    store = open_store(tmp_path / "acts")
    cfg = CausalConfig(bootstrap=20, steer_latents=1, steer_prompts=1, steer_seeds=1, steer_steps=6,
                       steer_prompt_notes=4, alphas=[4.0], min_songs=1, min_firing=1, min_controls=1)
    targets = [Target(j, "next.pitch_class=C", "t+1", "test") for j in range(4)]
    result = causal_hook(adapter, HOOK, dictionary, adapter.open_dataset(DATA), store.songs, targets,
                         {t.latent for t in targets}, HookSettings.from_config(cfg, "all", 0))
    rows = result["latents"]
    assert rows and all(set(r["delta_ce_fire"]) == {"token", "total"} for r in rows)
    assert {r["effect_kind"] for r in rows} == {"label_prob_drop"}
    assert any(r.get("steering") for r in rows)  # generate() with a patch at every step
