"""The GPU check (run through ``bench/gpu_check.sh`` on a CUDA machine): tests, demo, benchmarks.

Each step runs in a subprocess under its own time limit, so a hang or a crash in one
still leaves the others' results; ``gpu_check.json`` (in ``$OUT`` when set, else
``bench/results/``) names the device and holds, per step, its status, seconds and what
it measured: the test suite's counts and failures with CUDA visible, the demo pipeline's
stage times on CUDA, and the GPU rows of the benchmarks. Without CUDA it says so and
runs nothing (``--allow-cpu`` runs the steps anyway, to try the script on a CPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run(cmd: list[str], limit: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in the repository root with a time limit; its output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit,
                                  env={**os.environ, **(env or {})})
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f}s"
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "log": log.name}


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), memory_gib=round(props.total_memory / 2**30, 1),
                    devices=torch.cuda.device_count())
    return info


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failed tests' ids from a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed[:50]}


def step_tests(out: Path, limit: float, workers: int) -> dict[str, Any]:
    xml = out / "gpu_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-o", "addopts=-ra"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", str(workers), "--dist", "loadfile"]  # as pyproject's addopts
    except ImportError:
        pass
    result = run(cmd, limit, out / "gpu_tests.log")
    result.update(junit_summary(xml))
    return result


def step_demo(out: Path, limit: float) -> dict[str, Any]:
    manifest = ROOT / "reports" / "demo-cuda" / "manifest.json"
    result = run([sys.executable, "-m", "music_interpret", "run", "pipeline.yaml", "--set", "run=demo-cuda",
                  "--set", "device=cuda", "--set", "extract.output=data/activations/demo-cuda"],
                 limit, out / "gpu_demo.log")
    try:
        stages = json.loads(manifest.read_text())["stages"]
        result["stages"] = {k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in stages.items()}
        result["downstream"] = _downstream(ROOT / "reports" / "demo-cuda" / "train")
    except (OSError, ValueError, KeyError):
        pass
    return result


def _downstream(train: Path) -> dict[str, Any]:
    out = {}
    for metrics in sorted(train.glob("dictionaries/*/metrics.json")):
        m = json.loads(metrics.read_text())
        out[metrics.parent.name] = {"holdout_fvu": m.get("holdout", {}).get("fvu"),
                                    "holdout_l0": m.get("holdout", {}).get("l0"),
                                    "recovered": m.get("downstream", {}).get("recovered", {}).get("total")}
    return out


def step_bench(out: Path, name: str, args: list[str], limit: float) -> dict[str, Any]:
    target = out / f"gpu_bench_{name}.json"
    result = run([sys.executable, "-m", f"bench.{name}", *args, "--out", str(target)], limit,
                 out / f"gpu_bench_{name}.log")
    with contextlib.suppress(OSError, ValueError):
        result["result"] = json.loads(target.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--tests-limit", type=float, default=150)
    p.add_argument("--demo-limit", type=float, default=90)
    p.add_argument("--bench-limit", type=float, default=60)
    p.add_argument("--extract-limit", type=float, default=110)
    p.add_argument("--sae-limit", type=float, default=120)
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers when available")
    p.add_argument("--skip", nargs="*", default=[], choices=("tests", "demo", "bench"))
    p.add_argument("--allow-cpu", action="store_true", help="run the steps without CUDA too")
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    from bench.machine import machine

    report: dict[str, Any] = {"machine": machine(), **device_info(), "steps": {}}
    if not report["cuda_available"] and not args.allow_cpu:
        report["note"] = "CUDA is not available: nothing was run"
    else:
        steps = report["steps"]
        if "tests" not in args.skip:
            steps["tests"] = step_tests(out, args.tests_limit, args.workers)
        if "demo" not in args.skip:
            steps["demo"] = step_demo(out, args.demo_limit)
        if "bench" not in args.skip:
            steps["sae_train"] = step_bench(out, "sae_train", ["--gpu-only", "--tokens", "524288"],
                                            args.sae_limit)
            steps["extract_scale"] = step_bench(out, "extract_scale", ["--copies", "10"],
                                                args.extract_limit)
            steps["feature_token"] = step_bench(  # 16k latents on CUDA; memory flat in the tokens
                out, "feature_token", ["--device", "cuda", "--d-sae", "16384", "--tokens", "1048576",
                                       "--threads", "8", "--fractions", "0.5", "1"], args.bench_limit)
    path = out / "gpu_check.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)
    for name, step in report["steps"].items():
        extra = {k: step[k] for k in ("passed", "failures", "errors", "skipped") if k in step}
        print(f"{name:<10} {step['status']:<24} {step['seconds']:>7}s {extra or ''}")
    print(f"wrote {path} ({report.get('device', 'no CUDA device')})")
    ok = all(re.match(r"ok$", s["status"]) for s in report["steps"].values())
    return 0 if ok and report["steps"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
