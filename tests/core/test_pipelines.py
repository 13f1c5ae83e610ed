"""Every pipeline shipped in pipelines/ validates (with small stand-ins for its model and data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from music_interpret.adapters.mmt.init_model import init_model
from tests.conftest import FIXTURES, REPO, run_cli


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_shipped_pipeline_validates(tmp_path: Path, name: str) -> None:
    import yaml

    adapter = (yaml.safe_load((REPO / "pipelines" / name).read_text()).get("model") or {}).get("adapter", "mmt")
    if adapter == "mmt":
        model = init_model(tmp_path / "model", dim=64, layers=6, heads=1, max_seq_len=1024, max_beat=256)
    else:  # a plugin's adapter (hf_remi: plugins/music-interpret-hf-remi) with its committed model
        from music_interpret.plugins import PluginRegistry

        if PluginRegistry().find("model_adapter", adapter) is None:
            pytest.skip(f"the {adapter} adapter's plugin is not installed (make init installs plugins/*)")
        model = REPO / "models" / "bach" / "hf-remi"
    data = FIXTURES / "mmt" / "data" / "bach" / "processed"
    result = run_cli("validate", str(REPO / "pipelines" / name), "--set", f"model.path={model}",
                     "--set", f"data.path={data}", "--set", f"output_dir={tmp_path / 'reports'}",
                     "--set", f"extract.output={tmp_path / 'acts'}",
                     "--set", f"train.store={FIXTURES / 'store_v1'}",
                     "--set", f"analyze.store={FIXTURES / 'store_v1'}")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
