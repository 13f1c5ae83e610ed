"""MMT forward throughput: our adapter vs a reference built on x-transformers 0.25.9.

The driver (this module's :func:`main`, standard library only) starts two long-lived
worker processes and sends them one JSON command per line:

* ``ours``: the project interpreter (``.venv/bin/python``), :mod:`music_interpret` only;
* ``ref``: ``bench/.venv-xt/bin/python`` with x-transformers 0.25.9 (:mod:`xt_reference`).

Both first check their logits against the MMT fixture references. Then, per variant
(abs-pos = MMT's default, rotary) the ``ours`` worker builds a randomly initialised model
(seeded), saves its ``state_dict`` and random codes; the reference loads them with
``strict=True``. Timed forwards (``torch.inference_mode()``, an all-True padding mask as
MMT's collate passes) alternate between the two processes, so background load hits both
alike; only one process computes at a time. Parity is the max abs logits difference.

Run: ``python -m bench mmt_forward [--quick]``; results go to
``bench/results/mmt_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "mmt_forward.json"
N_TOKENS = (5, 257, 13, 129, 33, 65)  # MMT's field sizes with max_beat 256
VARIANTS = {
    "ape": {"abs_pos_emb": True, "rel_pos_emb": False},
    "rpe": {"abs_pos_emb": False, "rel_pos_emb": True},
}
VARIANT_NAMES = {"ape": "abs-pos", "rpe": "rotary"}
FIXTURE_TOL = 1e-5  # max abs logits difference on real positions (fixture README)
# fp32 parity: max abs logits diff <= PARITY_REL_TOL * max(1, max|ref logits|) (the fixture
# README's criterion). bf16 differences are reported, not enforced: x-transformers keeps its
# rotary frequencies and positions in the model dtype, ours computes the angles in fp32.
PARITY_REL_TOL = {"float32": 1e-5, "bfloat16": 5e-2}
MIN_SPEEDUP = 1.5  # issue requirement, CPU fp32


# --------------------------------------------------------------------------- worker side


class Worker:
    """Command handler inside a worker process (imports torch lazily)."""

    def __init__(self, side: str, threads: int) -> None:
        import torch

        self.torch = torch
        self.side = side
        torch.set_num_threads(threads)
        self.model: Any = None
        self.codes: Any = None
        self.mask: Any = None
        self.device = "cpu"

    # model construction -------------------------------------------------------------

    def _config(self, variant: str, dim: int, layers: int, heads: int, seq_len: int) -> Any:
        kw = dict(
            dim=dim,
            layers=layers,
            heads=heads,
            max_seq_len=seq_len,
            n_tokens=N_TOKENS,
            **VARIANTS[variant],
        )
        if self.side == "ours":
            from music_interpret.adapters.mmt.model import MMTConfig

            return MMTConfig(**kw)
        from xt_reference import RefConfig

        return RefConfig(**kw)

    def _build(self, cfg: Any) -> Any:
        if self.side == "ours":
            from music_interpret.adapters.mmt.model import MMTModel

            return MMTModel(cfg)
        from xt_reference import RefMMT

        return RefMMT(cfg)

    # commands -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Interpreter, torch and thread facts."""
        torch = self.torch
        out: dict[str, Any] = {
            "python": sys.executable,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }
        if self.side == "ref":
            import importlib.metadata as md

            out["x_transformers"] = md.version("x-transformers")
        else:
            out["x_transformers_importable"] = _importable("x_transformers")
        return out

    def fixtures(self) -> dict[str, float]:
        """Max abs logits difference vs the MMT fixture references (real positions)."""
        if self.side == "ref":
            from xt_reference import check_fixtures

            return check_fixtures(FIXTURE_TOL)
        import numpy as np

        from music_interpret.adapters.mmt.loading import load_mmt

        fixtures = ROOT / "tests" / "fixtures" / "mmt"
        diffs = {}
        for run in ("ape-tiny", "rpe-tiny"):
            ref = np.load(fixtures / "reference" / f"{run}.npz", allow_pickle=False)
            model, _ = load_mmt(fixtures / "models" / "bach" / run)
            with self.torch.inference_mode():
                logits = model(
                    self.torch.from_numpy(ref["seq"]), self.torch.from_numpy(ref["mask"])
                )
            real = ref["mask"]
            diffs[run] = max(
                float(np.abs(lg.numpy()[real] - ref[f"logits_{i}"][real]).max())
                for i, lg in enumerate(logits)
            )
            if not diffs[run] <= FIXTURE_TOL:
                raise AssertionError(f"ours {run}: logits differ by {diffs[run]:.3g}")
        return diffs

    def make(
        self,
        variant: str,
        dim: int,
        layers: int,
        heads: int,
        seq_len: int,
        batch: int,
        seed: int,
        state: str,
        codes: str,
    ) -> dict[str, Any]:
        """Seeded random model and codes, saved for both sides (``ours`` only)."""
        torch = self.torch
        torch.manual_seed(seed)
        model = self._build(self._config(variant, dim, layers, heads, seq_len))
        torch.save(model.state_dict(), state)
        gen = torch.Generator().manual_seed(seed + 1)
        fields = [torch.randint(0, n, (batch, seq_len), generator=gen) for n in N_TOKENS]
        torch.save(torch.stack(fields, dim=-1), codes)
        return {"params": sum(p.numel() for p in model.parameters())}

    def setup(
        self,
        variant: str,
        dim: int,
        layers: int,
        heads: int,
        seq_len: int,
        batch: int,
        state: str,
        codes: str,
        device: str,
        dtype: str,
        warmup: int,
    ) -> dict[str, Any]:
        """Load the shared weights (strict) and codes, move them, warm up."""
        torch = self.torch
        self.model = None
        model = self._build(self._config(variant, dim, layers, heads, seq_len))
        model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True), strict=True)
        self.device = device
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.codes = torch.load(codes, weights_only=True)[:batch].to(device)
        self.mask = torch.ones(self.codes.shape[:2], dtype=torch.bool, device=device)
        self.time(warmup)
        return {"ok": True}

    def time(self, n: int) -> list[float]:
        """Seconds for each of ``n`` forwards."""
        import time

        torch = self.torch
        out = []
        with torch.inference_mode():
            for _ in range(n):
                self._sync()
                t0 = time.perf_counter()
                self.model(self.codes, self.mask)
                self._sync()
                out.append(time.perf_counter() - t0)
        return out

    def logits(self, path: str) -> dict[str, Any]:
        """Save the six logits (as float32, on the CPU) to ``path``."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(self.codes, self.mask)
        torch.save([lg.float().cpu() for lg in out], path)
        return {"ok": True}

    def compare(self, path: str) -> dict[str, float]:
        """Max abs difference between our logits and the reference's saved at ``path``."""
        torch = self.torch
        ref = torch.load(path, weights_only=True)
        with torch.inference_mode():
            out = [lg.float().cpu() for lg in self.model(self.codes, self.mask)]
        return {
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(out, ref, strict=True)),
            "max_abs_ref": max(float(b.abs().max()) for b in ref),
        }

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def worker_main(side: str, threads: int) -> None:
    """Serve JSON commands from stdin; replies go to the real stdout, prints to stderr."""
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    worker = Worker(side, threads)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            result = {"result": getattr(worker, op)(**cmd)}
        except Exception as err:  # reported to the driver, which fails loudly
            result = {"error": f"{type(err).__name__}: {err}"}
        reply.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- driver side


class Proc:
    """A worker process speaking the line protocol."""

    def __init__(self, side: str, python: str, threads: int) -> None:
        env = dict(os.environ)
        path = [str(BENCH)] + ([str(ROOT)] if side == "ours" else [])
        env["PYTHONPATH"] = os.pathsep.join(path)
        cmd = [python, str(Path(__file__)), "--worker", side, "--threads", str(threads)]
        self.side = side
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )

    def __call__(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died during {op!r}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.side} worker, {op}: {msg['error']}")
        return msg["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def ours_python() -> str:
    """The project venv's interpreter, else the current one."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-able results (raises on parity failure)."""
    sys.path.insert(0, str(BENCH))
    import env as bench_env  # bench/env.py

    ref_python = str(bench_env.create())
    threads = args.threads or os.cpu_count() or 1
    ours, ref = Proc("ours", ours_python(), threads), Proc("ref", ref_python, threads)
    from bench.machine import machine  # driver side only: workers run this file as a script

    results: dict[str, Any] = {"machine": machine(), "threads": threads, "rows": []}
    failures: list[str] = []
    try:
        results["ours_env"], results["ref_env"] = ours("info"), ref("info")
        if results["ours_env"]["x_transformers_importable"]:
            print("note: x_transformers is importable in our interpreter (not used by ours)")
        results["fixtures"] = {"ours": ours("fixtures"), "ref": ref("fixtures")}
        print(
            f"fixture parity (max abs logits diff, real positions, tol {FIXTURE_TOL}): "
            f"ours {results['fixtures']['ours']}, ref {results['fixtures']['ref']}"
        )
        targets = [("cpu", "float32")]
        if results["ours_env"]["cuda"] and results["ref_env"]["cuda"] and not args.cpu_only:
            targets += [("cuda", "float32"), ("cuda", "bfloat16")]
        shape = dict(dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
        with tempfile.TemporaryDirectory(prefix="mmt-bench-") as tmp:
            for variant in args.variants:
                state, codes = f"{tmp}/{variant}.pt", f"{tmp}/{variant}-codes.pt"
                made = ours(
                    "make",
                    variant=variant,
                    batch=max(args.batches),
                    seed=args.seed,
                    state=state,
                    codes=codes,
                    **shape,
                )
                for device, dtype in targets:
                    for batch in args.batches:
                        row = _measure(
                            ours,
                            ref,
                            args,
                            variant,
                            batch,
                            device,
                            dtype,
                            state,
                            codes,
                            shape,
                            f"{tmp}/ref-logits.pt",
                        )
                        row["params"] = made["params"]
                        results["rows"].append(row)
                        print(_fmt_row(row), flush=True)
                        failures += row["failures"]
    finally:
        ours.close()
        ref.close()
    results["failures"] = failures
    return results


def _measure(
    ours: Proc,
    ref: Proc,
    args: argparse.Namespace,
    variant: str,
    batch: int,
    device: str,
    dtype: str,
    state: str,
    codes: str,
    shape: dict[str, int],
    logits_path: str,
) -> dict[str, Any]:
    common = dict(
        variant=variant,
        batch=batch,
        state=state,
        codes=codes,
        device=device,
        dtype=dtype,
        warmup=args.warmup,
        **shape,
    )
    ours("setup", **common)
    ref("setup", **common)
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for i in range(args.repeats):  # alternate, and alternate who goes first
        pair = [("ours", ours), ("ref", ref)]
        for name, proc in pair if i % 2 == 0 else pair[::-1]:
            times[name] += proc("time", n=1)
    ref("logits", path=logits_path)
    parity = ours("compare", path=logits_path)
    ref("setup", **{**common, "warmup": 0, "batch": 1})  # release the big activations
    tokens = batch * args.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    tol = PARITY_REL_TOL[dtype] * max(1.0, parity["max_abs_ref"])
    row = {
        "variant": VARIANT_NAMES[variant],
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "seq_len": args.seq_len,
        "tokens": tokens,
        "ours_s": med["ours"],
        "ref_s": med["ref"],
        "ours_tok_s": tokens / med["ours"],
        "ref_tok_s": tokens / med["ref"],
        "speedup": med["ref"] / med["ours"],
        "speedup_paired": statistics.median(r / o for o, r in zip(*times.values(), strict=True)),
        "speedup_best": min(times["ref"]) / min(times["ours"]),
        "times": times,
        "parity_max_abs_diff": parity["max_abs_diff"],
        "max_abs_logit": parity["max_abs_ref"],
        "parity_tol": tol,
        "failures": [],
    }
    label = f"{row['variant']} {device} {dtype} B={batch}"
    if dtype == "float32" and not parity["max_abs_diff"] <= tol:  # bf16: reported only
        row["failures"].append(f"{label}: parity {parity['max_abs_diff']:.3g} > {tol:.3g}")
    if device == "cpu" and dtype == "float32" and row["speedup"] < MIN_SPEEDUP:
        row["failures"].append(f"{label}: speedup {row['speedup']:.2f}x < {MIN_SPEEDUP}x")
    return row


HEADER = (
    "| variant | device | dtype | B×T | ours tok/s | ref tok/s | speedup (paired, best) | "
    "max abs logits diff |\n|---|---|---|---|---:|---:|---:|---:|"
)


def _fmt_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['variant']} | {r['device']} | {r['dtype']} | {r['batch']}×{r['seq_len']} | "
        f"{r['ours_tok_s']:,.0f} | {r['ref_tok_s']:,.0f} | {r['speedup']:.2f}x "
        f"({r['speedup_paired']:.2f}x, {r['speedup_best']:.2f}x) | "
        f"{r['parity_max_abs_diff']:.2e} |"
    )


def table(results: dict[str, Any]) -> str:
    """Markdown table of the rows, with the machine line."""
    m = results["machine"]
    gpu = results["ours_env"]["gpu"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {results['threads']} torch threads, "
        f"{'GPU ' + gpu if gpu else 'no GPU'}, "
        f"torch {results['ours_env']['torch']} (ours) / {results['ref_env']['torch']} + "
        f"x-transformers {results['ref_env']['x_transformers']} (ref), {m['date']}",
        "",
        HEADER,
    ]
    lines += [_fmt_row(r) for r in results["rows"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench mmt_forward", description=__doc__.split("\n")[0]
    )
    p.add_argument("--worker", choices=("ours", "ref"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["ape", "rpe"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per side (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: abs-pos, B=1, 2 repeats, no result file"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.variants, args.batches, args.repeats = ["ape"], [1], 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 on a parity or speed failure)."""
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.threads or os.cpu_count() or 1)
        return 0
    results = run(args)
    print()
    print(table(results))
    if not args.quick:
        from music_interpret.jsonio import to_jsonable, write_json_atomic

        write_json_atomic(args.out, to_jsonable(results))  # temporary name, then rename
        print(f"\nwrote {args.out}")
    for failure in results["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
