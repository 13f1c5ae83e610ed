"""Kill the extraction with SIGKILL mid-way; the rerun resumes and ends bitwise identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import music_interpret as mi
from tests.extract.conftest import write_pipeline

EXTRACT = "hooks: [resid_pre.0, resid_post.2]\nbatch_size: 1\nstore: {name: netcdf, shard_tokens: 300}"


def _cmd(pipeline):
    return [sys.executable, "-m", "music_interpret", "run", str(pipeline)]


def _shards(store):
    try:
        return len(json.loads((store / "store.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    # reference: an uninterrupted run
    ref = write_pipeline(tmp_path, model="rpe-tiny", data="bach", extract=EXTRACT, run="ref")
    assert subprocess.run(_cmd(ref), capture_output=True).returncode == 0
    # the same run, killed after its second shard
    pipeline = write_pipeline(tmp_path, model="rpe-tiny", data="bach", extract=EXTRACT, run="cut")
    partial = tmp_path / "acts" / "cut.partial"
    proc = subprocess.Popen(_cmd(pipeline), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _shards(partial) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _shards(partial)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= done_before < 24, "the kill must land in the middle of the extraction"
    assert not (tmp_path / "acts" / "cut").exists()  # nothing looks complete
    # rerun: resumes after the complete shards
    rerun = subprocess.run(_cmd(pipeline), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after {done_before} complete shard(s)" in rerun.stderr
    a = mi.open_activations(tmp_path / "acts" / "ref", lazy=False)
    b = mi.open_activations(tmp_path / "acts" / "cut", lazy=False)
    assert a.sizes == b.sizes
    assert np.array_equal(a.activations.values, b.activations.values)  # bitwise
    for name in a.coords:
        assert np.array_equal(a[name].values, b[name].values), name
