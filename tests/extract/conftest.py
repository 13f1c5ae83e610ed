"""Helpers to run the extract stage on the MMT fixtures."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "mmt"


def write_pipeline(tmp: Path, *, model: str = "ape-tiny", data: str = "quartets",
                   extract: str = "layers: [0, 1]", run: str = "x") -> Path:
    path = tmp / f"{run}.yaml"
    path.write_text(textwrap.dedent(f"""
        run: {run}
        output_dir: {tmp / 'reports'}
        stages: [extract]
        model: {{path: {FIX / 'models' / 'bach' / model}}}
        data: {{path: {FIX / 'data' / data / 'processed'}}}
        extract:
    """) + textwrap.indent(textwrap.dedent(extract).strip() + f"\noutput: {tmp / 'acts' / run}\n", "  "))
    return path


@pytest.fixture
def fix() -> Path:
    return FIX
