"""Nothing a user owns is lost; every bad input is one line; exit codes tell the truth.

Engine-level guarantees, checked with the toy plugin (fast): output folders that a stage
may not replace, locks on every output, observer hooks that raise, stages that exit,
SIGTERM, the run summary, ``--stages ''``, partial folders of refused stages,
``plugins --json | head``, list indices in ``--set``, YAML that is not UTF-8 or expands
through aliases, non-finite numbers, unknown devices and the exit status 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from music_interpret.config import apply_override, load_yaml
from music_interpret.errors import UserError
from tests.conftest import make_distribution, run_cli
from tests.core.toyplugin import RAISING_OBSERVER, TOY_PLUGIN


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_distribution(tmp_path / "site", "mi-toy", {"mi_toy_plugin": TOY_PLUGIN},
                             {"toy": "mi_toy_plugin"})


def write(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def toy_pipeline(tmp_path: Path, run: str = "r1", count: str = "n: 3", name: str = "p.yaml") -> Path:
    head = textwrap.dedent(f"""
        run: {run}
        output_dir: out
        stages: [count, total]
        count:
          log: count.log
    """)
    return write(tmp_path, head + textwrap.indent(textwrap.dedent(count).strip(), "  ") + "\n", name)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# -- 1. never replace what a stage did not write -----------------------------------------


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path, site: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    path = toy_pipeline(tmp_path, count=f"output: {precious}")
    for command in ("validate", "run"):
        result = run_cli(command, str(path), site=site)
        assert result.returncode == 2, result.stderr
        assert errors(result) == [
            f"error: count.output: {precious} exists and was not written by stage 'count' "
            "(no .stage.json); refusing to replace it: choose another output folder or move it away"]
        assert "Traceback" not in result.stderr
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert not (tmp_path / "precious.partial").exists() and not (tmp_path / "out").exists()


def test_replaces_only_its_own_output(tmp_path: Path, site: Path) -> None:
    out = tmp_path / "mine"
    path = toy_pipeline(tmp_path, count=f"output: {out}")
    assert run_cli("run", str(path), site=site).returncode == 0
    assert json.loads((out / ".stage.json").read_text())["stage"] == "count"
    again = run_cli("run", str(path), "--force", site=site)
    assert again.returncode == 0, again.stderr
    # the total stage's folder is not the count stage's to replace
    other = toy_pipeline(tmp_path, count=f"output: {tmp_path / 'out' / 'r1' / 'total'}", name="q.yaml")
    result = run_cli("run", str(other), "--stages", "count", site=site)
    assert result.returncode == 2
    assert "holds the output of stage 'total', not 'count'" in result.stderr
    assert (tmp_path / "out" / "r1" / "total" / "total.json").exists()


def test_refuses_a_foreign_partial_folder(tmp_path: Path, site: Path) -> None:
    partial = tmp_path / "out" / "r1" / "count.partial"
    partial.mkdir(parents=True)
    (partial / "notes.txt").write_text("mine")
    result = run_cli("run", str(toy_pipeline(tmp_path)), site=site)
    assert result.returncode == 2
    assert errors(result) == [f"error: count: {partial} exists and is not a partial output of "
                              "stage 'count' (no .fingerprint of it); refusing to replace it"]
    assert (partial / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["equal", "parent", "inside"])
def test_output_may_not_overlap_an_input(tmp_path: Path, site: Path, where: str) -> None:
    data = tmp_path / "data" / "notes"
    data.mkdir(parents=True)
    (data / "song.csv").write_text("beat,position,pitch,duration,program\n")
    out = {"equal": data, "parent": data.parent, "inside": data / "acts"}[where]
    path = write(tmp_path, f"""
        run: r1
        output_dir: out
        stages: [count]
        data: {{path: {data}}}
        count: {{output: {out}, log: count.log}}
    """)
    result = run_cli("validate", str(path), site=site)
    assert result.returncode == 2
    expected = "lies inside the input data.path" if where == "inside" else "is or contains the input data.path"
    assert expected in result.stderr
    assert (data / "song.csv").exists()


def test_outputs_may_not_collide_or_swallow_the_run_folder(tmp_path: Path, site: Path) -> None:
    path = toy_pipeline(tmp_path, count=f"output: {tmp_path / 'out' / 'r1' / 'total'}")
    result = run_cli("validate", str(path), site=site)
    assert result.returncode == 2 and "is also the output of stage 'total'" in result.stderr
    path = toy_pipeline(tmp_path, count=f"output: {tmp_path / 'out'}")
    result = run_cli("validate", str(path), site=site)
    assert result.returncode == 2 and "is or contains the run folder" in result.stderr


# -- 2. locks on every output, and what was published ------------------------------------


def test_two_runs_sharing_an_output_are_kept_apart(tmp_path: Path, site: Path) -> None:
    shared = tmp_path / "shared"
    # the first run writes for about 10 s: the second must start (imports included) and meet
    # the lock within that window, which took over 4 s once on a loaded machine
    first = toy_pipeline(tmp_path, "a", f"output: {shared}\nn: 200\nsleep: 0.05", "a.yaml")
    second = toy_pipeline(tmp_path, "b", f"output: {shared}\nn: 200\nsleep: 0.05", "b.yaml")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.Popen([sys.executable, "-m", "music_interpret", "run", str(first)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "shared.partial" / "numbers.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not started.exists():
        time.sleep(0.02)
    result = run_cli("run", str(second), site=site)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert result.returncode == 2
    assert errors(result) == [f"error: {shared}: another run is writing it; wait for it to finish"]
    marker = json.loads((shared / ".stage.json").read_text())
    manifest = json.loads((tmp_path / "out" / "a" / "manifest.json").read_text())
    published = manifest["stages"]["count"]["published"]
    assert published["publish_id"] == marker["publish_id"] and published["fingerprint"] == marker["fingerprint"]
    # the second run, once the first is done: the same output is up to date
    again = run_cli("run", str(second), site=site)
    assert again.returncode == 0 and "count: skipped" in again.stderr
    manifest = json.loads((tmp_path / "out" / "b" / "manifest.json").read_text())
    assert manifest["stages"]["count"]["published"]["publish_id"] == marker["publish_id"]


# -- 5. observers, sys.exit, SIGTERM -----------------------------------------------------


def test_raising_observer_hooks_do_not_stop_the_run(tmp_path: Path, site: Path) -> None:
    make_distribution(site, "mi-observer", {"mi_observer": RAISING_OBSERVER}, {"observer": "mi_observer"})
    ok = run_cli("run", str(toy_pipeline(tmp_path)), site=site)
    assert ok.returncode == 0, ok.stderr
    assert ("warning: plugin mi-observer:observer: mi_stage_start raised RuntimeError: "
            "observer broke at start (ignored)") in ok.stderr
    assert "mi_stage_end raised ValueError: observer broke at end" in ok.stderr
    failed = run_cli("run", str(toy_pipeline(tmp_path, run="r2", count="fail: true")), site=site)
    assert failed.returncode == 1
    assert "RuntimeError: count failed on purpose" in failed.stderr  # the stage's own error
    assert "mi_stage_error raised RuntimeError: observer broke on error (ignored)" in failed.stderr


@pytest.mark.parametrize("code", [0, 3])
def test_a_stage_calling_sys_exit_has_failed(tmp_path: Path, site: Path, code: int) -> None:
    result = run_cli("run", str(toy_pipeline(tmp_path, count=f"exit_code: {code}")), site=site)
    assert result.returncode == 1
    assert errors(result) == [f"error: stage 'count' failed: it called sys.exit({code})"]
    manifest = json.loads((tmp_path / "out" / "r1" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["count"]["status"] == "failed"
    assert not (tmp_path / "out" / "r1" / "count").exists()


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, site: Path) -> None:
    path = toy_pipeline(tmp_path, count="n: 400\nsleep: 0.05")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.Popen([sys.executable, "-m", "music_interpret", "run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out" / "r1" / "count.partial" / "numbers.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "out" / "r1" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["stages"]["count"]["status"] == "interrupted"
    assert not (tmp_path / "out" / "r1" / "count").exists()


# -- 8. the run summary, --stages '', partial folders of refused stages ------------------


def test_summary_counts_only_this_runs_stages(tmp_path: Path, site: Path) -> None:
    path = toy_pipeline(tmp_path)
    assert run_cli("run", str(path), site=site).returncode == 0
    only = run_cli("run", str(path), "--stages", "total", "--force", site=site)
    assert only.returncode == 0
    assert "complete: 1 stage(s) run, 0 skipped" in only.stdout
    empty = run_cli("run", str(path), "--stages", "", site=site)
    assert empty.returncode == 2 and errors(empty) == [
        "error: --stages: no stage named (stages: count, total)"]


def test_missing_upstream_leaves_no_partial_folder(tmp_path: Path, site: Path) -> None:
    result = run_cli("run", str(toy_pipeline(tmp_path)), "--stages", "total", site=site)
    assert result.returncode == 2 and "needs the output of stage 'count'" in result.stderr
    assert not list((tmp_path / "out" / "r1").glob("*.partial"))


# -- 6/7. inputs that used to give tracebacks, and what validate catches ----------------


def test_output_dir_that_is_a_file(tmp_path: Path, site: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    for command in ("validate", "run"):
        result = run_cli(command, str(toy_pipeline(tmp_path)), site=site)
        assert result.returncode == 2, result.stderr
        assert len(errors(result)) == 1 and "is a file, not a folder" in result.stderr
        assert "Traceback" not in result.stderr


def test_non_utf8_yaml(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"run: demo\n# caf\xe9\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert errors(result) == [f"error: {path}:2: not UTF-8 text (byte 0xe9 at offset 15); "
                              "save the file as UTF-8"]


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 1,000,000 values"):
        load_yaml(path)
    assert time.perf_counter() - started < 5
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and len(errors(result)) == 1
    # ordinary aliases are fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {n: 3}\ncount: *b\n")
    assert load_yaml(ok)["count"] == {"n": 3}


def test_non_finite_numbers_and_unknown_devices(tmp_path: Path, site: Path) -> None:
    path = toy_pipeline(tmp_path, count="learner: toy_sae")
    result = run_cli("validate", str(path), "--set", "count.learner.l1_coeff=.nan", "--set", "device=cdua",
                     site=site)
    assert result.returncode == 2
    assert "error: count.learner.l1_coeff: expected a finite number, got nan" in result.stderr
    assert "error: device: unknown device 'cdua' (did you mean 'cuda'?)" in result.stderr
    inf = run_cli("validate", str(path), "--set", "count.learner.l1_coeff=-.inf", site=site)
    assert "expected a finite number, got -inf" in inf.stderr


def test_model_path_that_is_a_file(tmp_path: Path, site: Path) -> None:
    model = tmp_path / "best_model.pt"
    model.write_bytes(b"\0")
    path = write(tmp_path, f"run: r1\noutput_dir: out\nstages: [count]\nmodel: {{path: {model}}}\n")
    result = run_cli("validate", str(path), site=site)
    assert result.returncode == 2
    assert errors(result) == [f"error: model.path: {model} is a file; expected a folder"]


def test_exit_status_3_for_an_unavailable_stage(tmp_path: Path) -> None:
    path = write(tmp_path, "run: r1\nstages: [count]\n")  # no toy plugin installed
    result = run_cli("validate", str(path))
    assert result.returncode == 2  # unknown, not a standard stage
    path = write(tmp_path, "run: r1\nstages: [extract]\nmodel: {path: .}\ndata: {path: .}\n", "q.yaml")
    env = {"MUSIC_INTERPRET_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "from music_interpret import plugins\n"
        "real = plugins.PluginRegistry._add_class\n"
        "def skip(self, cls, kind, *a):\n"
        "    if getattr(cls, 'name', '') != 'extract': real(self, cls, kind, *a)\n"
        "plugins.PluginRegistry._add_class = skip\n"
        "from music_interpret.cli import main\n"
        f"sys.exit(main(['run', {str(path)!r}]))\n")],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "stage 'extract' is not available in this installation" in result.stderr


def test_downstream_off_as_the_readme_writes_it(tmp_path: Path) -> None:
    from music_interpret.config import Converter
    from music_interpret.stages.train import TrainConfig

    conv = Converter(None, tmp_path)
    cfg = conv.build(TrainConfig, load_yaml(write(tmp_path, "downstream: off\n")), "train")
    assert conv.errors == [] and cfg.downstream == "off"
    cfg = conv.build(TrainConfig, {"downstream": True}, "train")
    assert cfg.downstream == "on"


# -- 9. pipes and list indices ----------------------------------------------------------


@pytest.mark.parametrize("command", ["plugins", "registry"])
def test_json_listing_into_a_closed_pipe(command: str) -> None:
    result = subprocess.run(f"{sys.executable} -m music_interpret {command} --json | head -c 1",
                            shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout == "["
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_set_with_list_indices() -> None:
    raw = {"analyze": {"analyzers": ["feature_token", {"name": "probe", "k": [1]}]}}
    apply_override(raw, "analyze.analyzers[0].top=0")
    apply_override(raw, "analyze.analyzers[1].k[0]=4")
    assert raw["analyze"]["analyzers"] == [{"name": "feature_token", "top": 0}, {"name": "probe", "k": [4]}]
    with pytest.raises(UserError, match=r"analyze.analyzers\[5\] does not exist \(analyze.analyzers has 2"):
        apply_override(raw, "analyze.analyzers[5].top=1")
    with pytest.raises(UserError, match=r"analyze is not a list"):
        apply_override(raw, "analyze[0]=1")
    with pytest.raises(UserError, match="cannot read the key path"):
        apply_override(raw, "analyze..x=1")
