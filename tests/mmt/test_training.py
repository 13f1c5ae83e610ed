"""The MMT trainer: bf16 steps, bitwise resume after SIGKILL, early stopping, half-precision
checkpoints through the adapter, and the refusal to write into a foreign folder."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.adapters.mmt import train_demo
from music_interpret.adapters.mmt.adapter import MMTAdapter
from music_interpret.adapters.mmt.loading import load_mmt, read_checkpoint, upcast_half
from music_interpret.adapters.mmt.train_files import BEST, LAST, METRICS_FILE
from music_interpret.adapters.mmt.train_recipe import lr_factor
from music_interpret.adapters.mmt.training import (
    Progress,
    TrainOptions,
    evals_without_progress,
    progress_from_json,
    train,
)
from music_interpret.engine import run_lock
from music_interpret.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "mmt" / "data" / "bach" / "processed"
FIXTURE_MODELS = REPO / "tests" / "fixtures" / "mmt" / "models" / "bach"
TINY = {"dim": 16, "layers": 1, "heads": 1, "max_seq_len": 64, "max_beat": 16, "batch_size": 4,
        "threads": 1, "precision": "fp32", "learning_rate": 3e-3, "lr_warmup_steps": 2,
        "lr_decay_steps": 40}  # fmt: skip


def _opts(out: Path, **kw) -> TrainOptions:
    return TrainOptions(data=DATA, out=out, **{**TINY, **kw})


def _quiet(msg: str) -> None:
    pass


def _history(metrics: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]


def test_lr_factor_is_mmts_schedule() -> None:
    # warm-up (step + 1) / warmup; linear decay ending at step decay_end (not after warm-up)
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_bf16_steps_reduce_the_loss(tmp_path: Path) -> None:
    metrics = train(_opts(tmp_path / "run", precision="bf16", steps=24, valid_steps=8, dropout=0.0,
                          patience=0, aug=False), log=_quiet)  # fmt: skip
    assert metrics["precision"] == "bf16"
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["train_total"] < first["train_total"] - 1.0
    assert last["valid"]["total"] < first["valid"]["total"] - 1.0
    ckpt = torch.load(tmp_path / "run" / LAST, weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}  # fp32 master weights


_KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from music_interpret.adapters.mmt.training import (
    Progress,
    TrainOptions,
    evals_without_progress,
    progress_from_json,
    train,
)
kw = json.loads(sys.argv[1])
opts = TrainOptions(**{**kw, "data": Path(kw["data"]), "out": Path(kw["out"])})
kill_at = int(sys.argv[2])
train(opts, on_step=lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == kill_at else None)
"""


@pytest.mark.parametrize("rel_pos_emb", [False, True])
def test_bf16_hot_path_has_no_fp32_matmuls(rel_pos_emb: bool) -> None:
    """Under bf16 autocast every matmul and attention kernel of a training step (forward
    and backward, right-padded batch) takes bf16 inputs, and attention stays on SDPA's
    fused kernel (no math-path fallback) when attention dropout is 0."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from music_interpret.adapters.mmt import representation as rep
    from music_interpret.adapters.mmt.model import MMTConfig, MMTModel, field_losses

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, tuple[torch.dtype, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = tree_leaves((args, kwargs or {}))
            dtypes = tuple(t.dtype for t in leaves
                           if isinstance(t, torch.Tensor) and t.is_floating_point())  # fmt: skip
            self.ops.append((func.overloadpacket.__name__, dtypes))
            return func(*args, **(kwargs or {}))

    cfg = MMTConfig(64, 1, 2, 64, rep.N_TOKENS, rel_pos_emb=rel_pos_emb, dropout=0.1,
                    attn_dropout=0.0)  # fmt: skip
    model = MMTModel(cfg).train()
    codes = torch.ones(2, 32, 6, dtype=torch.long)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    with Record() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model.net.run(codes, mask)
            loss = field_losses(logits, codes, mask)["total"]
        loss.backward()
    heavy = [(n, d) for n, d in rec.ops if n in ("mm", "addmm", "bmm", "baddbmm") or "attention" in n]
    assert any(n == "_scaled_dot_product_flash_attention_for_cpu_backward" for n, _ in heavy)
    assert not any("math" in n for n, _ in heavy)
    for name, dtypes in heavy:
        matrices = dtypes[:-1] if name.endswith("attention_for_cpu_backward") else dtypes
        assert set(matrices) == {torch.bfloat16}, (name, dtypes)  # (the logsumexp is fp32)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    kw = {"steps": 10, "valid_steps": 3, "checkpoint_steps": 2, "patience": 0}
    reference = train(_opts(tmp_path / "ref", **kw), log=_quiet)

    opts = _opts(tmp_path / "resumed", **kw)
    args = json.dumps({k: str(v) if isinstance(v, Path) else v
                       for k, v in dataclasses.asdict(opts).items()})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # killed after step 7: last.pt holds step 6 (an evaluation), step 7 is lost and redone
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, args, "7"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = torch.load(opts.out / LAST, weights_only=True)
    assert json.loads(killed["progress"])["step"] == 6
    resumed = train(opts, log=_quiet)

    assert _history(resumed) == _history(reference)
    assert resumed["valid_loss_per_field"] == reference["valid_loss_per_field"]
    assert resumed["best_step"] == reference["best_step"] and resumed["tokens_seen"] == reference["tokens_seen"]
    assert [s["from_step"] for s in resumed["sessions"]] == [0, 6]
    a = read_checkpoint(tmp_path / "ref" / BEST)
    b = read_checkpoint(opts.out / BEST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (torch.load(d / LAST, weights_only=True) for d in (tmp_path / "ref", opts.out))
    assert all(torch.equal(la["model"][k], lb["model"][k]) for k in la["model"])
    for sa, sb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert la["scheduler"] == lb["scheduler"] and torch.equal(la["torch_rng"], lb["torch_rng"])
    assert la["aug_rng"] == lb["aug_rng"]


def test_early_stopping_on_a_planted_curve(tmp_path: Path) -> None:
    planted = [5.0, 4.0, 4.5, 4.0, 4.2, 3.0, 2.0]  # 4.0 again is no improvement
    seen: list[dict[str, torch.Tensor]] = []

    def fake_evaluate(model, valid, batch_size, precision):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        total = planted[len(seen) - 1]
        fields = ("type", "beat", "position", "pitch", "duration", "instrument")
        return {**dict.fromkeys(fields, total / 6), "total": total}

    opts = _opts(tmp_path / "run", steps=100, valid_steps=2, patience=3)
    metrics = train(opts, evaluate_fn=fake_evaluate, log=_quiet)
    assert [h["valid"]["total"] for h in metrics["history"]] == planted[:5]
    assert metrics["steps"] == 10 and metrics["best_step"] == 4
    assert metrics["stopped"].startswith("early stopping")
    best = read_checkpoint(opts.out / BEST)
    assert all(torch.equal(best[k], seen[1][k]) for k in best)  # the weights of evaluation 2
    args = json.loads((opts.out / "train-args.json").read_text())
    assert args["early_stopping"] is True and args["early_stopping_tolerance"] == 2  # MMT's meaning
    # continuing a stopped run with the same options trains no further
    again = train(opts, evaluate_fn=fake_evaluate, log=_quiet)
    assert again["steps"] == 10 and len(seen) == 5



def test_min_delta_counts_only_gains_above_it(tmp_path: Path) -> None:
    history = [{"valid": {"total": t}} for t in (5.0, 4.0, 3.95, 3.92, 3.5, 3.49)]
    assert evals_without_progress(history, 0.0) == 0  # 3.49 is a new best
    assert evals_without_progress(history, 0.1) == 1  # 3.5 counted (4.0 - 3.5 > 0.1), 3.49 not
    assert evals_without_progress(history, 0.6) == 4  # only 4.0 counted (5.0 - 4.0)

    planted = [5.0, 4.0, 3.95, 3.92, 3.9, 3.0]

    def fake_evaluate(model, valid, batch_size, precision):
        total = planted[len(calls)]
        calls.append(total)
        fields = ("type", "beat", "position", "pitch", "duration", "instrument")
        return {**dict.fromkeys(fields, total / 6), "total": total}

    calls: list[float] = []
    opts = _opts(tmp_path / "run", steps=100, valid_steps=2, patience=3, min_delta=0.2)
    metrics = train(opts, evaluate_fn=fake_evaluate, log=_quiet)
    # 3.95, 3.92 and 3.9 are new bests (saved), but none gains 0.2 on 4.0: stop after three
    assert calls == planted[:5] and metrics["steps"] == 10 and metrics["best_step"] == 10
    assert "by more than 0.2 nats" in metrics["stopped"]
    # continuing with a smaller min_delta (a resumable option) trains on, by the new rule
    calls.clear()
    planted[:] = [3.0] * 4
    again = train(dataclasses.replace(opts, min_delta=0.0), evaluate_fn=fake_evaluate, log=_quiet)
    assert calls == [3.0] * 4 and again["steps"] == 18 and again["best_step"] == 12
    with pytest.raises(UserError, match="--min-delta"):
        dataclasses.replace(opts, min_delta=-1.0).check()


def test_progress_of_earlier_checkpoints_loads() -> None:
    """last.pt of earlier versions also saved the patience count, now derived from the history."""
    saved = json.dumps({**dataclasses.asdict(Progress(step=7)), "bad_evals": 3})
    assert progress_from_json(saved) == Progress(step=7)

def test_float16_checkpoint_loads_through_the_adapter(tmp_path: Path) -> None:
    opts = _opts(tmp_path / "run", steps=4, valid_steps=4, save_dtype="float16")
    train(opts, log=_quiet)
    stored = read_checkpoint(opts.out / BEST)
    last = torch.load(opts.out / LAST, weights_only=True)["best_model"]  # float32 weights
    assert {v.dtype for v in stored.values()} == {torch.float16}

    adapter = MMTAdapter()
    adapter.load(opts.out)
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())
    exact, _ = load_mmt(opts.out)
    codes = torch.as_tensor(np.load(REPO / "tests/fixtures/mmt/reference/ape-tiny.npz")["seq"])
    codes = codes[:, : opts.max_seq_len].clamp(max=opts.max_beat)  # in every vocabulary
    with torch.no_grad():
        got = adapter.model.net(codes)
        exact.load_state_dict({k: v.half().float() for k, v in last.items()})
        rounded = exact.net(codes)
        exact.load_state_dict(last)
        full = exact.net(codes)
    for g, r, f in zip(got, rounded, full, strict=True):
        assert torch.equal(g, r)  # upcast fp16 weights: exactly the rounded float32 model
        scale = float(f.abs().max())
        assert not torch.equal(g, f)  # the float16 storage did round
        assert float((g - f).abs().max()) <= 2e-3 * max(1.0, scale)  # within fp16 rounding


def test_mmt_fixture_checkpoints_load_untouched() -> None:
    for run in ("ape-tiny", "rpe-tiny"):
        state = read_checkpoint(FIXTURE_MODELS / run / "checkpoints" / "best_model.pt")
        assert upcast_half(state) is state
        model, _ = load_mmt(FIXTURE_MODELS / run)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])


def test_refuses_foreign_folders_and_resumes_its_own(tmp_path: Path, capsys) -> None:
    argv = [str(DATA), "", "--dim", "16", "--layers", "1", "--heads", "1", "--max-seq-len", "64",
            "--max-beat", "16", "--batch-size", "4", "--steps", "2", "--valid-steps", "2",
            "--threads", "1", "--precision", "fp32"]  # fmt: skip
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv[1] = str(foreign)
    assert train_demo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not made by this trainer" in err and "\n" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    ours = tmp_path / "ours"
    argv[1] = str(ours)
    assert train_demo.main(argv) == 0
    before = (ours / METRICS_FILE).read_text()
    capsys.readouterr()
    assert train_demo.main([*argv, "--dim", "32"]) == 2  # other configuration
    err = capsys.readouterr().err.strip()
    assert "other options" in err and "dim 16 -> 32" in err and "\n" not in err
    assert train_demo.main([*argv, "--max-beat", "8"]) == 2
    assert train_demo.main([*argv, "--threads", "2"]) == 0  # same run: continues (finished)
    after = json.loads((ours / METRICS_FILE).read_text())
    assert _history(after) == _history(json.loads(before))
    with pytest.raises(UserError, match="not a folder"):
        train(_opts(ours / "train-args.json"), log=_quiet)
    capsys.readouterr()
    assert train_demo.main([*argv[:1], str(tmp_path / "new"), "--seed", "-1"]) == 2
    if not torch.cuda.is_available():
        assert train_demo.main([*argv[:1], str(tmp_path / "new"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == err.count("\n") and not (tmp_path / "new").exists()
    with run_lock(ours / "checkpoints"), pytest.raises(UserError, match="another run"):
        train(TrainOptions(**vars(train_demo.build_parser().parse_args(argv))), log=_quiet)


def test_a_non_finite_loss_stops_with_a_message(tmp_path: Path, monkeypatch) -> None:
    from music_interpret.adapters.mmt import training

    monkeypatch.setattr(training, "train_step", lambda *args: float("nan"))
    with pytest.raises(UserError, match="training loss is nan.*holds step 0"):
        train(_opts(tmp_path / "run", steps=4, valid_steps=2), log=_quiet)


def test_length_pools_keep_every_song_and_pad_less() -> None:
    from music_interpret.adapters.mmt.train_recipe import epoch_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 1000, 500)
    plain = epoch_order(3, 1, 500)
    pooled = epoch_order(3, 1, 500, lengths, batch_size=8, pool=200)
    assert sorted(pooled.tolist()) == list(range(500))
    assert not np.array_equal(pooled, epoch_order(3, 2, 500, lengths, batch_size=8, pool=200))

    def padding(order: np.ndarray) -> float:
        batches = [order[i : i + 8] for i in range(0, 500, 8)]
        return sum(8 * lengths[b].max() - lengths[b].sum() for b in batches) / lengths.sum()

    assert padding(pooled) < 0.25 * padding(plain)
    assert np.array_equal(epoch_order(3, 1, 500, lengths, batch_size=8, pool=0), plain)
