"""Typed conversion details of the config loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from music_interpret.config import Converter, apply_override, load_yaml, parse_scalar


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    items: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    out: Path = Path("out")
    maybe: int | None = None


def test_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("a: 1e-3\nb: 5E+2\nc: 1.5\nd: '1e-3'\n")
    data = load_yaml(path)
    assert data["a"] == 0.001 and data["b"] == 500.0 and data["c"] == 1.5
    assert data["d"] == "1e-3"  # quoted stays a string ...
    conv = Converter(None, tmp_path)
    assert conv.convert(data["d"], float, "d") == 0.001  # ... but a float field accepts it
    assert parse_scalar("1e-3") == 0.001 and parse_scalar("[1, 2]") == [1, 2]


def test_nested_dataclass_and_paths(tmp_path):
    conv = Converter(None, tmp_path)
    obj = conv.build(Outer, {"name": "x", "items": [1, 2], "inner": {"rate": "2e-2", "mode": "b"}}, "")
    assert conv.errors == []
    assert obj.inner.rate == 0.02 and obj.inner.mode == "b" and obj.items == [1, 2]
    assert obj.out == tmp_path / "out" and obj.maybe is None


def test_collects_all_errors(tmp_path):
    conv = Converter(None, tmp_path)
    obj = conv.build(Outer, {"items": [1, "x"], "inner": {"mode": "c"}, "maybe": "q"}, "sec")
    assert obj is None
    assert conv.errors == [
        "sec.name: required key is missing",
        "sec.items[1]: expected an integer, got 'x'",
        "sec.inner.mode: expected one of 'a', 'b', got 'c'",
        "sec.maybe: expected an integer, got 'q'",
    ]


def test_apply_override_builds_mappings():
    data = {"train": {"learner": "relu"}}
    apply_override(data, "train.learner.l1_coeff=3e-4")
    apply_override(data, "run=other")
    assert data == {"train": {"learner": {"name": "relu", "l1_coeff": 0.0003}}, "run": "other"}
