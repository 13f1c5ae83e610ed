"""``run``: stage order, skip-if-done, --force, --stages, manifest, crashes and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import make_distribution, run_cli
from tests.core.toyplugin import TOY_PLUGIN


@pytest.fixture
def site(tmp_path):
    return make_distribution(tmp_path / "site", "mi-toy", {"mi_toy_plugin": TOY_PLUGIN},
                             {"toy": "mi_toy_plugin"})


@pytest.fixture
def pipeline(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent("""
        run: r1
        output_dir: out
        stages: [count, total]
        count:
          n: 4
          log: count.log
    """))
    return path


def run(pipeline, site, *args, env=None):
    return run_cli("run", str(pipeline), *args, site=site, env=env)


def log_lines(tmp_path):
    path = tmp_path / "count.log"
    return path.read_text().splitlines() if path.exists() else []


def test_runs_in_order_then_skips_when_done(tmp_path, pipeline, site):
    events = tmp_path / "events.txt"
    first = run(pipeline, site, env={"TOY_EVENTS": str(events)})
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "out" / "r1"
    assert (run_dir / "count" / "numbers.txt").read_text().split() == ["0", "1", "2", "3"]
    assert json.loads((run_dir / "total" / "total.json").read_text()) == {"total": 6}
    assert events.read_text().splitlines() == ["start count", "end count done", "start total", "end total done"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stages"]["count"]["status"] == "done"
    assert manifest["stages"]["count"]["summary"] == {"n": 4, "l1": 0.001}
    assert manifest["config"]["count"]["n"] == 4
    assert "python" in manifest["versions"] and "mi-toy==1.0.0" in manifest["versions"]["plugins"]

    second = run(pipeline, site)
    assert second.returncode == 0
    assert "count: skipped" in second.stderr and "total: skipped" in second.stderr
    assert log_lines(tmp_path) == ["run 4"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["count"]["status"] == "skipped"


def test_force_and_config_change_rerun(tmp_path, pipeline, site):
    assert run(pipeline, site).returncode == 0
    assert run(pipeline, site, "--force").returncode == 0
    assert log_lines(tmp_path) == ["run 4", "run 4"]
    changed = run(pipeline, site, "--set", "count.n=2")
    assert changed.returncode == 0
    assert log_lines(tmp_path) == ["run 4", "run 4", "run 2"]
    # the downstream stage reran too, because its upstream changed
    assert json.loads((tmp_path / "out" / "r1" / "total" / "total.json").read_text()) == {"total": 1}
    assert "total: done" in changed.stderr


def test_stages_option_runs_a_subset(tmp_path, pipeline, site):
    only_total = run(pipeline, site, "--stages", "total")
    assert only_total.returncode == 2
    assert "needs the output of stage 'count'" in only_total.stderr
    assert run(pipeline, site, "--stages", "count").returncode == 0
    assert not (tmp_path / "out" / "r1" / "total").exists()
    assert run(pipeline, site, "--stages", "total").returncode == 0
    bad = run(pipeline, site, "--stages", "nope")
    assert bad.returncode == 2 and "'nope' is not a stage of this pipeline" in bad.stderr


def test_crash_leaves_nothing_that_looks_complete(tmp_path, pipeline, site):
    result = run(pipeline, site, "--set", "count.fail=true")
    assert result.returncode != 0
    run_dir = tmp_path / "out" / "r1"
    assert not (run_dir / "count").exists()
    assert (run_dir / "count.partial" / "numbers.txt").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["stages"]["count"]["status"] == "failed"
    assert "count failed on purpose" in manifest["stages"]["count"]["error"]
    # a later good run publishes normally
    assert run(pipeline, site).returncode == 0
    assert (run_dir / "count" / ".stage.json").exists() and not (run_dir / "count.partial").exists()


def test_ctrl_c_publishes_nothing(tmp_path, pipeline, site):
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.Popen(
        [sys.executable, "-m", "music_interpret", "run", str(pipeline), "--set", "count.n=200",
         "--set", "count.sleep=0.05"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    partial = tmp_path / "out" / "r1" / "count.partial" / "numbers.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    run_dir = tmp_path / "out" / "r1"
    assert not (run_dir / "count").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["stages"]["count"]["status"] == "interrupted"


def test_unavailable_stage_is_said_clearly(tmp_path):
    """A standard stage no installed plugin provides: validate and run both say so, nothing runs."""
    from music_interpret.config import parse_pipeline
    from music_interpret.engine import Engine
    from music_interpret.errors import ConfigError, StageUnavailable
    from music_interpret.plugins import PluginRegistry

    registry = PluginRegistry()
    registry._classes.pop(("stage", "extract"))  # as if no plugin provided it
    raw = {"output_dir": str(tmp_path / "reports"), "stages": ["note_stats", "extract"],
           "data": {"path": str(tmp_path)}}
    with pytest.raises(ConfigError) as info:
        parse_pipeline(raw, registry, tmp_path)
    assert info.value.problems == [
        "stages[1]: stage 'extract' is not available in this installation: no installed plugin "
        "provides it (`python -m music_interpret plugins` lists what is installed)"]
    pipeline = parse_pipeline({**raw, "stages": ["note_stats"]}, registry, tmp_path)
    pipeline.header.stages.append("extract")
    with pytest.raises(StageUnavailable, match="stage 'extract' is not available"):
        Engine(pipeline, registry).run()
    assert not (tmp_path / "reports").exists()


def test_help_on_every_command():
    for cmd in ([], ["run"], ["validate"], ["plugins"], ["registry"]):
        result = run_cli(*cmd, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
