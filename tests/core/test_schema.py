"""The JSON Schema of pipeline.yaml: generated from the configs, accepts the repository's
pipeline, rejects what the loader rejects by shape (unknown keys, types, plugin names)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from music_interpret.config import load_yaml
from music_interpret.plugins import get_registry
from music_interpret.schema import pipeline_schema
from tests.conftest import REPO, run_cli

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def validator() -> object:
    schema = pipeline_schema(get_registry())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator: object, doc: dict) -> list[str]:
    return [".".join(map(str, e.absolute_path)) or "<top>" for e in validator.iter_errors(doc)]


def test_repository_pipeline_is_valid(validator: object) -> None:
    assert errors(validator, load_yaml(REPO / "pipeline.yaml")) == []


def test_plugins_by_name_or_mapping(validator: object) -> None:
    doc = load_yaml(REPO / "pipeline.yaml")
    doc["analyze"]["analyzers"] = ["probe", {"name": "top_examples", "render_latents": 3}]
    doc["train"]["learner"] = {"name": "topk", "k": 8, "d_sae": 64}
    doc["train"]["downstream"] = False  # YAML 1.1's bare `off`
    assert errors(validator, doc) == []


@pytest.mark.parametrize(("path", "value", "where"), [
    (["stagse"], 1, "<top>"),
    (["train", "learner", "l1_coeff"], "abc", "train"),
    (["train", "learner", "k"], 8, "train"),                # relu_l1 has no k
    (["train", "steps"], 2.5, "train"),
    (["extract", "dtype"], "float8", "extract"),
    (["stages"], ["extract", "extrct"], "stages.1"),
    (["model", "adapter"], "mmtt", "model.adapter"),
    (["run"], "a b", "run"),
])
def test_rejects(validator: object, path: list[str], value: object, where: str) -> None:
    doc = copy.deepcopy(load_yaml(REPO / "pipeline.yaml"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    found = errors(validator, doc)  # at the key, or at the optional section holding it
    assert any(where == e or where.startswith(e + ".") for e in found), found


def test_cli_writes_the_schema(tmp_path: Path) -> None:
    result = run_cli("schema", "--out", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    schema = json.loads((tmp_path / "s.json").read_text())
    assert set(get_registry().names("stage")) <= set(schema["properties"])
    assert "k" in json.dumps(schema["$defs"]["plugin:dictionary_learner"])
    printed = run_cli("schema")
    assert json.loads(printed.stdout) == schema
