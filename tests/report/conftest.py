"""A small run through extract -> preprocess -> train -> analyze -> report on the MMT fixtures."""

from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path

import pytest

from tests.conftest import DEVICES

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"
ANALYZERS = ("feature_token", "probe", "top_examples", "note_share")  # note_share: plugins/


def registry() -> object:
    """The plugin registry, plus ``top_examples``/``report`` in process if not yet registered."""
    from music_interpret.hookspecs import hookimpl
    from music_interpret.plugins import PluginRegistry

    base = PluginRegistry()
    extra = types.ModuleType("tests_report_plugins")
    if base.find("analyzer", "top_examples") is None:
        def mi_analyzers() -> list[type]:
            from music_interpret.analyzers.examples import TopExamplesAnalyzer

            return [TopExamplesAnalyzer]

        extra.mi_analyzers = hookimpl(mi_analyzers)  # type: ignore[attr-defined]
    if base.find("stage", "report") is None:
        def mi_stages() -> list[type]:
            from music_interpret.stages.report import ReportStage

            return [ReportStage]

        extra.mi_stages = hookimpl(mi_stages)  # type: ignore[attr-defined]
    if not hasattr(extra, "mi_analyzers") and not hasattr(extra, "mi_stages"):
        return base
    sys.modules.setdefault(extra.__name__, extra)
    return PluginRegistry(extra=[extra])


def build_run(tmp: Path, *, songs: int = 4, device: str = "cpu") -> Path:
    """Run the whole pipeline on a few fixture songs; returns the run folder."""
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine

    reg = registry()
    analyzers = [a for a in ANALYZERS if reg.find("analyzer", a) is not None]
    options = {"top_examples": {"render_latents": 6, "render_sample": 2, "n_examples": 4,
                                "render_examples": 2},
               "probe": {"bootstrap": 10, "ks": [1], "attributes": ["pitch_class"]}}
    refs = [{"name": a, **options[a]} if a in options else a for a in analyzers]
    path = tmp / "small.yaml"
    path.write_text(textwrap.dedent(f"""
        run: small
        output_dir: {tmp / 'reports'}
        device: {device}
        stages: [extract, preprocess, train, analyze, report]
        model: {{path: {FIX / 'models' / 'bach' / 'ape-tiny'}}}
        data: {{path: {FIX / 'data' / 'bach' / 'processed'}}}
        extract: {{layers: [1], max_songs: {songs}, output: {tmp / 'acts'}}}
        train:
          learner: {{name: relu_l1, d_sae: 64, lr: 0.003, batch_size: 256}}
          steps: 30
        analyze: {{analyzers: {json.dumps(refs)}}}
        report: {{title: small test run, max_latent_pages: 10, sample_rest: 2}}
    """))
    pipeline = load_pipeline(path, reg)
    Engine(pipeline, reg, log=lambda msg: None).run()
    return pipeline.run_dir


@pytest.fixture(scope="session", params=DEVICES)
def small_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole chain on every available device (the analyzers and report included)."""
    return build_run(tmp_path_factory.mktemp(f"report-{request.param}"), device=request.param)
