"""The repository's own entry points: the demo pipeline validates, README and CI agree."""

from __future__ import annotations

from tests.conftest import REPO, run_cli


def test_root_pipeline_validates():
    result = run_cli("validate", "pipeline.yaml", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "extract" in result.stdout


def test_readme_quick_start_matches_ci_and_makefile():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == [
        "make init", "make test", "make demo"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "pip install" not in ci
    makefile = (REPO / "Makefile").read_text()
    for target in ("init:", "test:", "demo:", "bench:", "lint:"):
        assert f"\n{target}" in makefile
