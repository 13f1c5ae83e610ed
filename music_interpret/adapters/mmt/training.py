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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...engine import run_lock, write_json_atomic
from ...errors import UserError
from . import representation as rep
from .baselines import FIELDS, baselines
from .dataset import NoteDataset, open_dataset
from .windows import pad_codes

if TYPE_CHECKING:
    import torch

    from .model import MMTModel

MADE_BY = "music_interpret.adapters.mmt.train_demo"
RUN_FORMAT = 1
RUN_FILE = "train-run.json"
METRICS_FILE = "metrics.json"
BEST = Path("checkpoints") / "best_model.pt"
LAST = Path("checkpoints") / "last.pt"
SAVE_DTYPES = ("float32", "float16", "bfloat16")
LOG_SECONDS = 60.0  # a progress line at least this often between evaluations
PRECISIONS = ("auto", "fp32", "bf16")
# Options that may differ when a run is continued: they change neither the model nor
# the data order (only speed, bitwise roundings, where to stop, or the stored dtype).
RESUMABLE = ("steps", "patience", "device", "threads", "checkpoint_steps", "eval_batch_size",
             "save_dtype")  # fmt: skip
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
        if self.learning_rate <= 0 or self.grad_norm_clip <= 0:
            raise UserError("--learning-rate and --grad-norm-clip must be positive")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")


# --------------------------------------------------------------------------- recipe


def lr_factor(step: int, warmup: int, decay_end: int, multiplier: float) -> float:
    """MMT's ``get_lr_multiplier``: linear warm-up to 1 over ``warmup`` steps, then linear
    decay to ``multiplier`` at step ``decay_end``, constant after."""
    if step < warmup:
        return (step + 1) / warmup
    if step > decay_end:
        return multiplier
    position = (step - warmup) / max(1, decay_end - warmup)
    return max(multiplier, 1 - (1 - multiplier) * position)


def augment(notes: np.ndarray, rng: np.random.Generator, max_beat: int) -> np.ndarray:
    """MMT's augmentation: shift pitches by -5..+6 and pick a random start beat if too long."""
    notes = notes.copy()
    notes[:, 2] = np.clip(notes[:, 2] + rng.integers(-5, 7), 0, 127)
    n_beats = int(notes[-1, 0]) + 1
    if n_beats > max_beat:
        for _ in range(10):
            start = int(rng.integers(n_beats - max_beat))
            sliced = notes[(notes[:, 0] >= start) & (notes[:, 0] < start + max_beat)]
            if len(sliced) > 10:
                break
        sliced[:, 0] -= start
        notes = sliced
    return notes


def collate(seqs: Sequence[np.ndarray]) -> tuple[Any, Any]:
    """Zero-pad code arrays (T_i, 6) into a batch; returns (codes, mask) tensors."""
    import torch

    codes, mask = pad_codes(list(seqs))
    return torch.from_numpy(codes), torch.from_numpy(mask)


def epoch_order(seed: int, epoch: int, n: int, lengths: np.ndarray | None = None,
                batch_size: int = 1, pool: int = 0) -> np.ndarray:
    """The shuffled order of the ``n`` training songs in ``epoch`` (a function of both).

    With ``pool`` > 0 (and the songs' ``lengths``), batches of similar length: the shuffled
    songs are cut into pools of ``pool`` songs, each pool sorted by length and cut into
    batches of ``batch_size``, and the batches of the epoch shuffled. Every song still comes
    once per epoch; a batch pads much less than ``batch_size`` random songs do.
    """
    rng = np.random.default_rng([seed, 0, epoch])
    order = rng.permutation(n)
    if pool <= 0 or lengths is None:
        return order
    batches = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(np.asarray(lengths)[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))])


def train_args(opts: TrainOptions, dataset: NoteDataset, precision: str) -> dict[str, Any]:
    """``train-args.json``: the keys (and key order) MMT's ``train.py`` writes, then ours."""

    def rel(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    def names(split: str) -> str:
        found = [d / f"{split}-names.txt" for d in (dataset.notes_dir, dataset.root)]
        return rel(next((f for f in found if f.exists()), found[-1]))

    return {
        "dataset": dataset.notes_dir.parent.name.removesuffix("_notes") or "demo",
        "train_names": names("train"), "valid_names": names("valid"),
        "in_dir": rel(dataset.notes_dir), "out_dir": rel(opts.out), "batch_size": opts.batch_size,
        "use_csv": False, "aug": opts.aug, "max_seq_len": opts.max_seq_len,
        "max_beat": opts.max_beat, "dim": opts.dim, "layers": opts.layers, "heads": opts.heads,
        "dropout": opts.dropout, "abs_pos_emb": not opts.rel_pos_emb,
        "rel_pos_emb": opts.rel_pos_emb, "steps": opts.steps, "valid_steps": opts.valid_steps,
        # MMT stops after early_stopping_tolerance + 1 evaluations without improvement
        "early_stopping": opts.patience > 0,
        "early_stopping_tolerance": opts.patience - 1 if opts.patience > 0 else 20,
        "learning_rate": opts.learning_rate, "lr_warmup_steps": opts.lr_warmup_steps,
        "lr_decay_steps": opts.lr_decay_steps, "lr_decay_multiplier": opts.lr_decay_multiplier,
        "grad_norm_clip": opts.grad_norm_clip, "gpu": None, "jobs": 0, "quiet": False,
        "attn_dropout": opts.dropout if opts.attn_dropout is None else opts.attn_dropout,
        "patience": opts.patience, "precision": precision, "save_dtype": opts.save_dtype,
        "length_pool": opts.length_pool,
    }  # fmt: skip


# --------------------------------------------------------------------------- device


def cpu_has_bf16() -> bool:
    """True if the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if probe is not None and probe():
                return True
    return False


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the device computes it natively, else fp32."""
    import torch

    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if precision == "bf16" and not supported and device.type == "cuda":
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    if precision == "bf16" and not supported:
        print("warning: this CPU has no bf16 instructions; bf16 will be emulated and slow",
              file=sys.stderr)
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) or nothing."""
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """The training notes, the encoded validation songs and a fingerprint of both."""

    train_set: NoteDataset
    train_notes: list[np.ndarray]
    train_codes: list[np.ndarray]  # unaugmented, for the baselines
    valid_codes: list[np.ndarray]
    sha256: str


def load_corpus(opts: TrainOptions) -> Corpus:
    """Read the train and valid splits of ``opts.data``."""
    digest = hashlib.sha256()
    splits = {}
    for split in ("train", "valid"):
        ds = open_dataset(opts.data, split)
        songs = []
        for name, notes in ds.items():
            if len(notes) == 0:
                raise UserError(f"{ds.path(name)}: song {name!r} has no notes")
            digest.update(f"{split}\0{name}\0{notes.shape}\0".encode())
            digest.update(np.ascontiguousarray(notes, dtype=np.int64).tobytes())
            songs.append(notes)
        splits[split] = (ds, songs)
    train_set, train_notes = splits["train"]
    encode = [rep.encode_song(n, opts.max_beat, opts.max_seq_len) for n in train_notes]
    valid = [rep.encode_song(n, opts.max_beat, opts.max_seq_len) for n in splits["valid"][1]]
    return Corpus(train_set, train_notes, encode, valid, digest.hexdigest())


# --------------------------------------------------------------------------- folder


def _config(opts: TrainOptions, precision: str) -> dict[str, Any]:
    keep = {k: v for k, v in dataclasses.asdict(opts).items()
            if k not in RESUMABLE and k not in ("data", "out")}  # fmt: skip
    keep["precision"] = precision
    return json.loads(json.dumps(keep))


def run_identity(opts: TrainOptions, corpus: Corpus, precision: str) -> dict[str, Any]:
    """What ``train-run.json`` records: the maker, the data fingerprint, the configuration."""
    return {
        "made_by": MADE_BY,
        "format": RUN_FORMAT,
        "data": str(opts.data),
        "data_sha256": corpus.sha256,
        "config": _config(opts, precision),
    }


def prepare_out(out: Path, identity: dict[str, Any]) -> bool:
    """Make ``out`` ready; True if it holds a run of this data and configuration to continue.

    A missing or empty folder is started afresh; one with a matching ``train-run.json``
    is continued; anything else raises :class:`UserError` (nothing is written).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        run_file = out / RUN_FILE
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("made_by") != MADE_BY:
            raise UserError(f"{out} exists and was not made by this trainer (no valid {RUN_FILE}); "
                            "give a new or empty folder")
        if old.get("format") != RUN_FORMAT:
            raise UserError(f"{out}: {RUN_FILE} has format {old.get('format')!r}, "
                            f"this trainer writes {RUN_FORMAT}; give a new folder")
        if old.get("data_sha256") != identity["data_sha256"]:
            raise UserError(f"{out} was trained on other data ({old.get('data')!r}, different "
                            f"songs or notes); give a new folder")
        new, was = identity["config"], old.get("config") or {}
        diff = [f"{k} {was.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(new) | set(was))
                if was.get(k) != new.get(k)]  # fmt: skip
        if diff:
            raise UserError(f"{out} was made with other options ({'; '.join(diff)}); "
                            "rerun with the same options to continue, or give a new folder")
        return True
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / ".gitignore").write_text("last.pt\n.lock\n.*.tmp\n")
    write_json_atomic(out / RUN_FILE, identity)
    return False


def torch_save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name in the same folder, fsync, then rename."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def mmt_state_dict(state: dict[str, torch.Tensor], params: set[str], dtype: str) -> dict[str, Any]:
    """A CPU copy of ``state`` with the parameters in ``dtype`` (buffers unchanged)."""
    import torch

    target = getattr(torch, dtype)
    return {k: v.detach().to("cpu", target if k in params else v.dtype, copy=True)
            for k, v in state.items()}  # fmt: skip


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model: MMTModel,
    valid: Sequence[np.ndarray],
    batch_size: int,
    precision: str = "fp32",
) -> dict[str, float]:
    """Per-field next-token loss on real targets of the validation songs (token-weighted).

    Songs are batched in order of length (less padding); the result does not depend on
    the order beyond float rounding.
    """
    import torch

    from .model import field_losses

    device = next(model.parameters()).device
    sums = dict.fromkeys((*FIELDS, "total"), 0.0)
    count = 0
    order = sorted(range(len(valid)), key=lambda i: (len(valid[i]), i))
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        for i in range(0, len(order), batch_size):
            codes, mask = collate([valid[j] for j in order[i : i + batch_size]])
            codes, mask = codes.to(device), mask.to(device)
            logits, _ = model.net.run(codes, mask)
            n = int(mask[:, 1:].sum())
            for k, v in field_losses(logits, codes, mask).items():
                sums[k] += float(v) * n
            count += n
    model.train(was_training)
    return {k: v / count for k, v in sums.items()}


# --------------------------------------------------------------------------- training


@dataclass
class Progress:
    """The plain-data part of ``last.pt`` (also what ``metrics.json`` reports)."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # songs of ``epoch_order(epoch)`` already used
    best: dict[str, float] | None = None  # validation losses at the best step, and "step"
    bad_evals: int = 0  # evaluations since the best one
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    running_sum: float = 0.0  # training losses since the last evaluation
    running_n: int = 0
    tokens: int = 0  # real input tokens trained on
    padded_tokens: int = 0  # batch x length, padding included
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    sessions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def stop_reason(opts: TrainOptions, p: Progress) -> str | None:
    """Why training stops now (None: it goes on)."""
    if opts.patience and p.best is not None and p.bad_evals >= opts.patience:
        return f"early stopping: {p.bad_evals} evaluations without improvement"
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
        p = Progress(**json.loads(ckpt["progress"]))
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
                p.bad_evals = 0
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}  # fmt: skip
                torch_save_atomic(mmt_state_dict(best_state, params, opts.save_dtype), out / BEST)
            else:
                p.bad_evals += 1
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

