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


def test_sae_train_gpu_rows_run_at_small_shapes_on_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's code path (rows, quality check, goals), at small shapes on CPU, so
    that the GPU machine's few minutes are not lost to a bug of the benchmark itself."""
    from bench import sae_train as B

    store, _ = B.build(tmp_path, 40_000, 512, 0)
    results: dict = {"rows": []}
    B._gpu_rows(results, store, device="cpu", d_sae=1024, batch=256, steps=12, big=2048)
    names = [r["approach"] for r in results["rows"]]
    assert names == ["ours", "ours-dense", "ours-topk", "ours-dense-topk", "ours-topk",
                     "saelens-standard", "saelens-topk"]
    for row in results["rows"]:
        assert row["tok_s"] > 0
    fast = results["rows"][2]
    assert fast["d_sae"] == 1024 and fast["quality"]["l0"] == pytest.approx(B.TOPK_K, abs=1)
    assert set(fast["versus_fp32"]) == {"fvu_ratio", "l0_ratio", "dead_diff", "ok"}
    assert results["rows"][4]["d_sae"] == 2048
    assert set(results["goals"]) == {"relu_l1", "topk"}
    assert not results["goals"]["topk"]["met"]  # no dense limit without a known GPU
