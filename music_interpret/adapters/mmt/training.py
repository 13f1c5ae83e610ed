"""Train an MMT model in MMT's checkpoint format: resumable, early-stopped, bf16 or fp32.

The recipe follows MMT's ``train.py``: Adam, MMT's learning-rate schedule (linear
warm-up over ``lr_warmup_steps``, then linear decay to ``lr_decay_multiplier`` at step
``lr_decay_steps``, constant after), gradient-norm clipping, dropout, pitch-shift and
random-start augmentation, one shuffled pass over the training songs per epoch (the
last batch of an epoch may be smaller), the best model chosen on the validation split.
Two changes: padding targets are left out of the loss, and the attention dropout can be
set apart from the other dropouts (``attn_dropout``; MMT uses ``dropout`` everywhere).

``<out>`` receives

* ``train-args.json``: MMT's keys (and key order), then ours (``attn_dropout``,
  ``patience``, ``precision``, ``save_dtype``); MMT's loaders read keys by name, so
  the extra keys do not disturb them;
* ``checkpoints/best_model.pt``: the best model's ``state_dict`` (MMT's format), its
  parameters stored in ``save_dtype`` (buffers stay float32);
* ``checkpoints/last.pt``: everything needed to continue (weights, optimiser,
  scheduler, RNG states, position in the data order, step, best so far, curve),
  written atomically at every evaluation and every ``checkpoint_steps`` steps;
* ``metrics.json``: per-field validation losses of the model and of the count
  baselines (:mod:`.baselines`), the learning curve, precision, threads and speed;
  rewritten at every evaluation;
* ``train-run.json``: what made the folder (data fingerprint and configuration).

Running the same command again continues from ``last.pt``; on CPU in fp32 with one
thread the result is bitwise the same as an uninterrupted run. A folder that exists
and was not made by this trainer for the same data and configuration is refused.

The recipe's pieces (schedule, augmentation, batches, validation loss, device and
precision) live in :mod:`.train_recipe`; the corpus, ``train-run.json`` and the
checkpoint files in :mod:`.train_files`. This module is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UserError
from ...jsonio import write_json_atomic
from ...outputs import run_lock
from . import representation as rep
from .baselines import FIELDS, baselines
from .train_files import (
    BEST,
    LAST,
    METRICS_FILE,
    RUN_FORMAT,
    Corpus,
    load_corpus,
    mmt_state_dict,
    prepare_out,
    run_identity,
    torch_save_atomic,
    train_args,
)
from .train_recipe import (
    augment,
    autocast,
    collate,
    epoch_order,
    evaluate,
    lr_factor,
    resolve_device,
    resolve_precision,
)

if TYPE_CHECKING:
    import torch

    from .model import MMTModel

SAVE_DTYPES = ("float32", "float16", "bfloat16")
LOG_SECONDS = 60.0  # a progress line at least this often between evaluations
PRECISIONS = ("auto", "fp32", "bf16")
BASELINE_DEFINITIONS = {
    "targets": "every song encoded as MMT's dataset does without augmentation; targets "
               "codes[1:] (T - 1 per song, no padding); nats per target, mean over all "
               "validation targets; total = sum of the six fields",
    "unigram": "P(x[t+1,f]=b) = (C_f(b) + 1) / (N_f + V_f), counts over the training targets",
    "bigram": "P(x[t+1,f]=b | x[t,f]=c) = (C_f(c,b) + 1) / (C_f(c) + V_f), consecutive pairs "
              "inside each training song; each field conditioned on its own previous code",
    "bigram_tuned": "the bigram with additive smoothing a_f instead of 1, a_f chosen from "
                    "10^-6..10 (4 per decade) by 5-fold cross-validation over the training "
                    "songs (song i in fold i % 5); the validation split is not used",
}  # fmt: skip


@dataclass
class TrainOptions:
    """Everything a training run depends on (the CLI's options)."""

    data: Path
    out: Path
    dim: int = 128
    layers: int = 4
    heads: int = 4
    max_seq_len: int = 1024
    max_beat: int = 256
    dropout: float = 0.1
    attn_dropout: float | None = None  # None: ``dropout`` (MMT)
    rel_pos_emb: bool = False
    batch_size: int = 8
    steps: int = 1500
    valid_steps: int = 250
    patience: int = 10  # 0: no early stopping
    min_delta: float = 0.0  # nats an evaluation must gain to reset the patience count
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    lr_decay_steps: int = 1500
    lr_decay_multiplier: float = 0.1
    grad_norm_clip: float = 1.0
    aug: bool = True
    seed: int = 0
    length_pool: int = 0  # >0: batches of similar length from pools of this many songs
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # 0: torch's default
    checkpoint_steps: int = 0  # 0: last.pt at evaluations only
    eval_batch_size: int = 0  # 0: batch_size
    save_dtype: str = "float32"

    def check(self) -> None:
        """Raise :class:`UserError` on an impossible option."""
        positive = ("dim", "layers", "heads", "max_seq_len", "max_beat", "batch_size", "steps",
                    "valid_steps", "lr_warmup_steps", "lr_decay_steps")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("patience", "threads", "checkpoint_steps", "eval_batch_size", "seed",
                     "length_pool"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if not self.min_delta >= 0:
            raise UserError(f"--min-delta must be >= 0, got {self.min_delta}")
        if self.learning_rate <= 0 or self.grad_norm_clip <= 0:
            raise UserError("--learning-rate and --grad-norm-clip must be positive")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")


# --------------------------------------------------------------------------- training


@dataclass
class Progress:
    """The plain-data part of ``last.pt`` (also what ``metrics.json`` reports)."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # songs of ``epoch_order(epoch)`` already used
    best: dict[str, float] | None = None  # validation losses at the best step, and "step"
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    running_sum: float = 0.0  # training losses since the last evaluation
    running_n: int = 0
    tokens: int = 0  # real input tokens trained on
    padded_tokens: int = 0  # batch x length, padding included
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    sessions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def progress_from_json(text: str) -> Progress:
    """The :class:`Progress` saved in ``last.pt``; the patience count ``bad_evals`` that
    earlier versions saved is dropped (it is derived from the history now)."""
    raw = json.loads(text)
    raw.pop("bad_evals", None)
    return Progress(**raw)


def evals_without_progress(history: list[dict[str, Any]], min_delta: float) -> int:
    """Evaluations since the last one that lowered the reference loss by more than ``min_delta``.

    The reference is the validation loss of that last evaluation (the first one starts it).
    With ``min_delta`` 0 this is the count since the best evaluation. It is computed from the
    history, so a run continued with another ``--min-delta`` counts by the new rule.
    """
    ref, count = None, 0
    for h in history:
        total = h["valid"]["total"]
        if ref is None or total < ref - min_delta:
            ref, count = total, 0
        else:
            count += 1
    return count


def stop_reason(opts: TrainOptions, p: Progress) -> str | None:
    """Why training stops now (None: it goes on)."""
    stalled = evals_without_progress(p.history, opts.min_delta) if opts.patience else 0
    if opts.patience and stalled >= opts.patience:
        gain = f" by more than {opts.min_delta:g} nats" if opts.min_delta else ""
        return f"early stopping: {stalled} evaluations without improvement{gain}"
    if p.step >= opts.steps:
        return f"reached --steps {opts.steps}"
    return None


def train_step(model: MMTModel, opt: torch.optim.Optimizer, sched: Any, codes: torch.Tensor,
               mask: torch.Tensor, precision: str, clip: float) -> float:  # fmt: skip
    """One optimiser step on a padded batch; returns its loss (sum of the six fields)."""
    import torch

    from .model import field_losses

    device = next(model.parameters()).device
    codes, mask = codes.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    with autocast(device, precision):
        logits, _ = model.net.run(codes, mask)
        loss = field_losses(logits, codes, mask)["total"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    return float(loss.detach())


EvaluateFn = Callable[["MMTModel", Sequence[np.ndarray], int, str], dict[str, float]]


def train(
    opts: TrainOptions,
    evaluate_fn: EvaluateFn | None = None,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or continue) the run in ``opts.out``; returns the final ``metrics.json``.

    ``evaluate_fn`` replaces :func:`evaluate` for the validation during training (tests
    plant a curve with it); ``on_step(step)`` runs after every optimiser step and any
    checkpoint written at that step.
    """
    import torch

    opts.check()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads_before = torch.get_num_threads()
    try:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        with contextlib.ExitStack() as stack:
            return _train(opts, evaluate_fn or evaluate, on_step, log, stack)
    finally:
        torch.set_num_threads(threads_before)


def _train(opts: TrainOptions, evaluate_fn: EvaluateFn, on_step: Callable[[int], None] | None,
           log: Callable[[str], None], stack: contextlib.ExitStack) -> dict[str, Any]:  # fmt: skip
    import torch

    from .loading import config_from_args
    from .model import MMTModel

    started = time.perf_counter()
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    corpus = load_corpus(opts)
    out = Path(opts.out)
    resume = prepare_out(out, run_identity(opts, corpus, precision))
    stack.enter_context(run_lock(out / "checkpoints"))  # one process per folder
    for stale in [*out.glob(".*.tmp"), *(out / "checkpoints").glob(".*.tmp")]:
        stale.unlink()  # left by a killed run
    args = train_args(opts, corpus.train_set, precision)
    write_json_atomic(out / "train-args.json", args)

    torch.manual_seed(opts.seed)
    cfg = dataclasses.replace(config_from_args(args), attn_dropout=opts.attn_dropout)
    model = MMTModel(cfg).to(device)
    model.train()
    params = {name for name, _ in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=opts.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, opts.lr_warmup_steps, opts.lr_decay_steps, opts.lr_decay_multiplier))
    aug_rng = np.random.default_rng([opts.seed, 1])
    p = Progress()
    best_state: dict[str, torch.Tensor] | None = None
    if resume and (out / LAST).is_file():
        ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        aug_rng.bit_generator.state = json.loads(ckpt["aug_rng"])
        p = progress_from_json(ckpt["progress"])
        best_state = ckpt["best_model"]
        if best_state is not None:  # the file may be newer than last.pt: rewrite it
            torch_save_atomic(mmt_state_dict(best_state, params, opts.save_dtype), out / BEST)
        log(f"resuming {out} at step {p.step} (epoch {p.epoch}, best valid "
            f"{p.best['total']:.4f} at step {p.best['step']})" if p.best else
            f"resuming {out} at step {p.step}")
    elif resume:
        log(f"{out}: no {LAST} yet; starting afresh")
    if cfg.attention_dropout > 0 and device.type == "cpu":
        log(f"note: attention dropout {cfg.attention_dropout} runs attention on SDPA's math "
            "path on CPU: 2.5x (fp32) to 4x (bf16) slower per step than --attn-dropout 0")

    base = baselines(corpus.train_codes, corpus.valid_codes, cfg.n_tokens)
    eval_bs = opts.eval_batch_size or opts.batch_size
    n_train = len(corpus.train_notes)
    lengths = np.array([len(x) for x in corpus.train_notes])

    def order_of(epoch: int) -> np.ndarray:
        return epoch_order(opts.seed, epoch, n_train, lengths, opts.batch_size, opts.length_pool)

    order = order_of(p.epoch)
    session = {"from_step": p.step, "device": str(device), "precision": precision,
               "threads": torch.get_num_threads(), "tokens": 0, "train_seconds": 0.0}  # fmt: skip
    p.sessions.append(session)
    wall_before = p.wall_seconds
    last_log = time.perf_counter()

    def save_last() -> None:
        progress = dataclasses.asdict(p)
        progress["wall_seconds"] = wall_before + time.perf_counter() - started
        torch_save_atomic({
            "format": RUN_FORMAT,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "aug_rng": json.dumps(aug_rng.bit_generator.state),
            "progress": json.dumps(progress),
            "best_model": best_state,
        }, out / LAST)  # fmt: skip

    def metrics(final: dict[str, float] | None, reason: str | None) -> dict[str, Any]:
        p.wall_seconds = wall_before + time.perf_counter() - started
        return _metrics(opts, p, corpus, base, precision, device, final, reason)

    while (reason := stop_reason(opts, p)) is None:
        t0 = time.perf_counter()
        picks = order[p.pos : p.pos + opts.batch_size]
        p.pos += len(picks)
        if p.pos >= n_train:
            p.epoch, p.pos = p.epoch + 1, 0
            order = order_of(p.epoch)
        seqs = []
        for i in picks:
            notes = augment(corpus.train_notes[i], aug_rng, opts.max_beat) if opts.aug \
                else corpus.train_notes[i]
            seqs.append(rep.encode_song(notes, opts.max_beat, opts.max_seq_len))
        codes, mask = collate(seqs)
        loss = train_step(model, opt, sched, codes, mask, precision, opts.grad_norm_clip)
        if not math.isfinite(loss):
            saved = json.loads(torch.load(out / LAST, weights_only=True)["progress"])["step"] \
                if (out / LAST).is_file() else 0
            raise UserError(f"step {p.step + 1}: the training loss is {loss}; {LAST} holds step "
                            f"{saved}. Lower --learning-rate or use --precision fp32 (a new folder)")
        p.step += 1
        p.running_sum += loss
        p.running_n += 1
        n_tok = sum(len(s) for s in seqs)
        p.tokens += n_tok
        p.padded_tokens += int(codes.shape[0] * codes.shape[1])
        dt = time.perf_counter() - t0
        p.train_seconds += dt
        session["tokens"] += n_tok
        session["train_seconds"] += dt
        if p.step % opts.valid_steps == 0 or p.step == opts.steps:
            t1 = time.perf_counter()
            valid = evaluate_fn(model, corpus.valid_codes, eval_bs, precision)
            p.eval_seconds += time.perf_counter() - t1
            improved = p.best is None or valid["total"] < p.best["total"]
            if improved:
                p.best = {**{k: float(valid[k]) for k in (*FIELDS, "total")}, "step": p.step}
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}  # fmt: skip
                torch_save_atomic(mmt_state_dict(best_state, params, opts.save_dtype), out / BEST)
            train_loss = p.running_sum / max(1, p.running_n)
            p.running_sum, p.running_n = 0.0, 0
            p.history.append({
                "step": p.step, "epoch": round(p.epoch + p.pos / n_train, 4),
                "tokens": p.tokens, "lr": opt.param_groups[0]["lr"], "train_total": train_loss,
                "valid": {k: float(valid[k]) for k in (*FIELDS, "total")},
                "seconds": round(wall_before + time.perf_counter() - started, 1),
            })  # fmt: skip
            save_last()
            write_json_atomic(out / METRICS_FILE, metrics(None, None))
            rate = session["tokens"] / max(session["train_seconds"], 1e-9)
            last_log = time.perf_counter()
            log(f"step {p.step:6d}  epoch {p.epoch + p.pos / n_train:6.2f}  train {train_loss:.4f}  "
                f"valid {valid['total']:.4f}{'*' if improved else ' '}  best {p.best['total']:.4f} "
                f"@{p.best['step']}  {rate:,.0f} tok/s  ({p.history[-1]['seconds']:.0f}s)")
        elif opts.checkpoint_steps and p.step % opts.checkpoint_steps == 0:
            save_last()
        if time.perf_counter() - last_log > LOG_SECONDS:
            last_log = time.perf_counter()
            rate = session["tokens"] / max(session["train_seconds"], 1e-9)
            log(f"step {p.step:6d}  epoch {p.epoch + p.pos / n_train:6.2f}  train "
                f"{p.running_sum / max(1, p.running_n):.4f} (since the last evaluation)  "
                f"{rate:,.0f} tok/s")
        if on_step is not None:
            on_step(p.step)

    if p.best is None:  # e.g. continued with --steps at or below the steps already done
        raise UserError(f"{out}: no evaluation yet; raise --steps above {p.step}")
    torch_save_atomic(mmt_state_dict(best_state, params, opts.save_dtype), out / BEST)
    write_json_atomic(out / "train-args.json", args)
    final = _final_evaluation(out, device, corpus, eval_bs)
    result = metrics(final, reason)
    write_json_atomic(out / METRICS_FILE, result)
    log(f"{reason}; best step {p.best['step']}, valid {final['total']:.4f} nats "
        f"(bigram {base['bigram']['total']:.4f}, tuned bigram {base['bigram_tuned']['total']:.4f})")
    return result


def _final_evaluation(out: Path, device: torch.device, corpus: Corpus, batch_size: int) -> dict:
    """The stored ``best_model.pt`` as the adapter loads it (float32), on the valid split."""
    from .loading import load_mmt

    model, _ = load_mmt(out, device=str(device))
    return evaluate(model, corpus.valid_codes, batch_size, "fp32")


def _metrics(opts: TrainOptions, p: Progress, corpus: Corpus, base: dict, precision: str,
             device: torch.device, final: dict[str, float] | None,
             reason: str | None) -> dict[str, Any]:  # fmt: skip
    import torch

    best_file = opts.out / BEST
    fields = (*FIELDS, "total")
    return {
        "finished": final is not None,
        "stopped": reason,
        "valid_loss_per_field": final,
        "valid_loss_note": "best_model.pt as stored (save_dtype), loaded by the adapter and "
                           "evaluated in float32 on the validation split; null until the end",
        "best_step": p.best["step"] if p.best else None,
        "best_valid_during_training": {k: p.best[k] for k in fields} if p.best else None,
        "unigram_baseline_per_field": base["unigram"],
        "bigram_baseline_per_field": base["bigram"],
        "bigram_tuned_baseline_per_field": base["bigram_tuned"],
        "bigram_tuned_alpha": base["bigram_tuned_alpha"],
        "baseline_definitions": BASELINE_DEFINITIONS,
        "steps": p.step,
        "epochs": round(p.epoch + p.pos / len(corpus.train_notes), 4),
        "tokens_seen": p.tokens,
        "train_songs": len(corpus.train_notes),
        "train_tokens_unaugmented": int(sum(len(c) for c in corpus.train_codes)),
        "valid_songs": len(corpus.valid_codes),
        "valid_targets": int(sum(len(c) - 1 for c in corpus.valid_codes)),
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "save_dtype": opts.save_dtype,
        "best_model_bytes": best_file.stat().st_size if best_file.exists() else None,
        "tokens_per_second": p.tokens / p.train_seconds if p.train_seconds else None,
        "padded_tokens_per_second": p.padded_tokens / p.train_seconds if p.train_seconds else None,
        "train_seconds": round(p.train_seconds, 1),
        "eval_seconds": round(p.eval_seconds, 1),
        "wall_seconds": round(p.wall_seconds, 1),
        "sessions": p.sessions,
        "torch": torch.__version__,
        "seed": opts.seed,
        "data_sha256": corpus.sha256,
        "history": p.history,
    }

