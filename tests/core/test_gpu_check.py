"""bench/gpu_check: the script that a CUDA machine runs (here: its CPU-side behaviour)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import junit_summary
from tests.conftest import REPO


def test_junit_summary(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
                   '<failure message="x"/></testcase><testcase classname="t" name="s"><skipped/></testcase>'
                   '<testcase classname="t" name="p"/></testsuite></testsuites>')
    assert junit_summary(xml) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                  "failed": ["tests.a::bad"]}
    assert junit_summary(tmp_path / "missing.xml") == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_available"] is False and report["steps"] == {}
    assert report["note"] == "CUDA is not available: nothing was run" and report["machine"]["cores"]
