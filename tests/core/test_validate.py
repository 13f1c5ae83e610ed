"""``validate``: every class of problem on its own line naming the YAML path; exit 2."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import make_distribution, run_cli
from tests.core.toyplugin import TOY_PLUGIN


@pytest.fixture
def site(tmp_path):
    return make_distribution(tmp_path / "site", "mi-toy", {"mi_toy_plugin": TOY_PLUGIN},
                             {"toy": "mi_toy_plugin"})


def write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def validate(path, site, *extra):
    result = run_cli("validate", str(path), *extra, site=site)
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


def test_valid_pipeline(tmp_path, site):
    path = write(tmp_path, """
        run: t1
        stages: [count]
        count:
          n: 5
          learner: {name: toy_sae, l1_coeff: 1e-3}
    """)
    code, err, out = validate(path, site)
    assert code == 0, err
    assert "valid" in out and "count" in out


def test_unknown_keys_with_suggestions(tmp_path, site):
    path = write(tmp_path, """
        run: t1
        stagse: [count]
        count:
          nn: 5
          learner: {name: toy_sae, l1_coef: 0.1}
    """)
    code, err, _ = validate(path, site)
    assert code == 2
    assert "error: stagse: unknown key (did you mean 'stages'?)" in err
    assert "error: count.nn: unknown key (did you mean 'n'?)" in err
    assert "error: count.learner.l1_coef: unknown key (did you mean 'l1_coeff'?)" in err


def test_wrong_types(tmp_path, site):
    path = write(tmp_path, """
        run: t1
        seed: many
        stages: [count]
        count:
          n: 2.5
          fail: "yes"
          learner: {name: toy_sae, l1_coeff: abc}
    """)
    code, err, _ = validate(path, site)
    assert code == 2
    assert "error: seed: expected an integer, got 'many'" in err
    assert "error: count.n: expected an integer, got 2.5" in err
    assert "error: count.fail: expected true or false, got 'yes'" in err
    assert "error: count.learner.l1_coeff: expected a number, got 'abc'" in err


def test_unknown_plugin_and_stage_names(tmp_path, site):
    path = write(tmp_path, """
        run: t1
        stages: [count, cuont]
        model: {path: ., adapter: mmtt}
        count:
          learner: toy_sea
    """)
    code, err, _ = validate(path, site)
    assert code == 2
    text = "\n".join(err)
    assert "count.learner: unknown dictionary learner 'toy_sea' (did you mean 'toy_sae'?" in text
    assert "model.adapter: unknown model adapter 'mmtt' (did you mean 'mmt'?" in text
    assert "stages[1]: unknown stage 'cuont' (did you mean 'count'?)" in text


def test_invalid_plugin_config(tmp_path, site):
    path = write(tmp_path, """
        stages: [count]
        count:
          learner: {name: toy_sae, d_sae: -4}
    """)
    code, err, _ = validate(path, site)
    assert code == 2
    assert err == ["error: count.learner: d_sae must be positive, got -4"]


def test_missing_input_paths_resolved_against_yaml_folder(tmp_path, site):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "here").mkdir()
    path = write(sub, """
        stages: [count]
        model: {path: missing_model}
        data: {path: here}
    """)
    code, err, _ = validate(path, site)
    assert code == 2
    assert err == [f"error: model.path: no such file or directory: {sub / 'missing_model'}"]


def test_yaml_syntax_error_and_missing_file(tmp_path, site):
    path = tmp_path / "bad.yaml"
    path.write_text("run: [unclosed\n")
    code, err, _ = validate(path, site)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}:")
    code, err, _ = validate(tmp_path / "nope.yaml", site)
    assert code == 2 and err == [f"error: {tmp_path / 'nope.yaml'}: no such file"]


def test_set_overrides_are_typed(tmp_path, site):
    path = write(tmp_path, """
        stages: [count]
        count: {learner: toy_sae}
    """)
    code, err, _ = validate(path, site, "--set", "count.learner.l1_coeff=abc")
    assert code == 2 and err == ["error: count.learner.l1_coeff: expected a number, got 'abc'"]
    code, err, _ = validate(path, site, "--set", "count.learner.l1_coeff=1e-4", "--set", "count.n=7")
    assert code == 0, err
    code, err, _ = validate(path, site, "--set", "count.n=seven")
    assert err == ["error: count.n: expected an integer, got 'seven'"]
    code, err, _ = validate(path, site, "--set", "countn")
    assert code == 2 and "expected KEY.PATH=VALUE" in err[0]
