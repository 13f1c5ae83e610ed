"""Train the small demo MMT model on CPU, in MMT's checkpoint format.

This is for the bundled demo and the tests; users bring their own MMT checkpoints.
The recipe follows MMT's ``train.py`` (Adam, linear warm-up then decay, gradient
clipping, dropout, pitch-shift and random-start augmentation, best model chosen on
the validation split), with one change: padding targets are left out of the loss.
Output: ``<out>/train-args.json`` with MMT's keys, ``<out>/checkpoints/best_model.pt``
(the whole model's ``state_dict``) and ``<out>/demo-metrics.json`` with the
per-field validation loss against a unigram baseline.

    python -m music_interpret.adapters.mmt.train_demo data/base/bach_notes models/bach/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from . import representation as rep
from .dataset import NoteDataset, open_dataset
from .windows import pad_codes

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")


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


def unigram_baseline(train: list[np.ndarray], valid: list[np.ndarray], n_tokens: Sequence[int]) -> dict[str, float]:
    """Cross-entropy on the validation targets of per-field code frequencies in training (add-one)."""
    out = {}
    for f, name in enumerate(FIELDS):
        counts = np.ones(n_tokens[f])
        for codes in train:
            np.add.at(counts, codes[1:, f], 1)
        logp = np.log(counts / counts.sum())
        targets = np.concatenate([codes[1:, f] for codes in valid])
        out[name] = float(-logp[targets].mean())
    out["total"] = float(sum(out[n] for n in FIELDS))
    return out


def evaluate(model: Any, valid: list[np.ndarray], batch_size: int) -> dict[str, float]:
    """Per-field next-token loss on real targets of the validation songs (token-weighted)."""
    import torch

    from .model import field_losses

    sums = dict.fromkeys((*FIELDS, "total"), 0.0)
    count = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(valid), batch_size):
            chunk = valid[i : i + batch_size]
            codes, mask = collate(chunk)
            logits, _ = model.net.run(codes, mask)
            n = int(mask[:, 1:].sum())
            for k, v in field_losses(logits, codes, mask).items():
                sums[k] += float(v) * n
            count += n
    model.train()
    return {k: v / count for k, v in sums.items()}


def train_args(ns: argparse.Namespace, dataset: NoteDataset) -> dict[str, Any]:
    """``train-args.json`` with the keys (and key order) MMT's ``train.py`` writes."""
    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    def names(split: str) -> str:
        found = [d / f"{split}-names.txt" for d in (dataset.notes_dir, dataset.root)]
        return rel(next((f for f in found if f.exists()), found[-1]))

    return {
        "dataset": dataset.notes_dir.parent.name.removesuffix("_notes") or "demo",
        "train_names": names("train"), "valid_names": names("valid"),
        "in_dir": rel(dataset.notes_dir), "out_dir": rel(ns.out), "batch_size": ns.batch_size,
        "use_csv": False, "aug": ns.aug, "max_seq_len": ns.max_seq_len, "max_beat": ns.max_beat,
        "dim": ns.dim, "layers": ns.layers, "heads": ns.heads, "dropout": ns.dropout,
        "abs_pos_emb": not ns.rel_pos_emb, "rel_pos_emb": ns.rel_pos_emb, "steps": ns.steps,
        "valid_steps": ns.valid_steps, "early_stopping": False, "early_stopping_tolerance": 20,
        "learning_rate": ns.learning_rate, "lr_warmup_steps": ns.lr_warmup_steps,
        "lr_decay_steps": ns.lr_decay_steps, "lr_decay_multiplier": ns.lr_decay_multiplier,
        "grad_norm_clip": ns.grad_norm_clip, "gpu": None, "jobs": 0, "quiet": False,
    }


def lr_factor(step: int, warmup: int, decay_steps: int, multiplier: float) -> float:
    """MMT's schedule: linear warm-up, then linear decay to ``multiplier`` over ``decay_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps))
    return 1.0 - (1.0 - multiplier) * progress


def train(ns: argparse.Namespace) -> dict[str, Any]:
    """Train, keep the best validation checkpoint, write everything atomically."""
    import torch

    from .loading import config_from_args
    from .model import MMTModel

    torch.manual_seed(ns.seed)
    rng = np.random.default_rng(ns.seed)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    train_set = open_dataset(ns.data, "train")
    valid_set = open_dataset(ns.data, "valid")
    train_notes = [notes for _, notes in train_set.items()]
    valid_codes = [rep.encode_song(n, ns.max_beat, ns.max_seq_len) for _, n in valid_set.items()]
    args = train_args(ns, train_set)
    model = MMTModel(config_from_args(args))
    model.train()
    n_tokens = model.net.cfg.n_tokens
    baseline = unigram_baseline([rep.encode_song(n, ns.max_beat, ns.max_seq_len) for n in train_notes],
                                valid_codes, n_tokens)
    opt = torch.optim.Adam(model.parameters(), lr=ns.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, ns.lr_warmup_steps, ns.lr_decay_steps, ns.lr_decay_multiplier))
    from .model import field_losses

    best: dict[str, Any] = {"total": math.inf}
    history = []
    t0 = time.perf_counter()
    tmp = ns.out.with_name(ns.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    running = 0.0
    for step in range(1, ns.steps + 1):
        picks = rng.integers(len(train_notes), size=ns.batch_size)
        seqs = []
        for i in picks:
            notes = augment(train_notes[i], rng, ns.max_beat) if ns.aug else train_notes[i]
            seqs.append(rep.encode_song(notes, ns.max_beat, ns.max_seq_len))
        codes, mask = collate(seqs)
        logits, _ = model.net.run(codes, mask)
        loss = field_losses(logits, codes, mask)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ns.grad_norm_clip)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % ns.valid_steps == 0 or step == ns.steps:
            valid = evaluate(model, valid_codes, ns.batch_size)
            train_loss = running / (ns.valid_steps if step % ns.valid_steps == 0 else step % ns.valid_steps)
            running = 0.0
            history.append({"step": step, "train_total": train_loss, "valid": valid,
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"step {step:5d}  train {train_loss:.3f}  valid {valid['total']:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            if valid["total"] < best["total"]:
                best = {**valid, "step": step}
                torch.save(model.state_dict(), tmp / "checkpoints" / "best_model.pt")
    metrics = {
        "valid_loss_per_field": {k: best[k] for k in (*FIELDS, "total")},
        "unigram_baseline_per_field": baseline,
        "best_step": best["step"],
        "train_songs": len(train_notes),
        "valid_songs": len(valid_codes),
        "valid_targets": int(sum(len(c) - 1 for c in valid_codes)),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": ns.seed,
        "history": history,
    }
    (tmp / "train-args.json").write_text(json.dumps(args))
    (tmp / "demo-metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if ns.out.exists():
        shutil.rmtree(ns.out)
    os.replace(tmp, ns.out)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m music_interpret.adapters.mmt.train_demo",
                                description="Train the small demo MMT model on CPU (MMT's format).")
    p.add_argument("data", type=Path, help="note dataset with train/valid split lists")
    p.add_argument("out", type=Path, help="model folder to write (train-args.json, checkpoints/)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=1024)
    p.add_argument("--max-beat", dest="max_beat", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rel-pos-emb", dest="rel_pos_emb", action="store_true",
                   help="rotary positions instead of the learned absolute embedding")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--valid-steps", dest="valid_steps", type=int, default=250)
    p.add_argument("--learning-rate", dest="learning_rate", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, default=100)
    p.add_argument("--lr-decay-steps", dest="lr_decay_steps", type=int, default=1500)
    p.add_argument("--lr-decay-multiplier", dest="lr_decay_multiplier", type=float, default=0.1)
    p.add_argument("--grad-norm-clip", dest="grad_norm_clip", type=float, default=1.0)
    p.add_argument("--no-aug", dest="aug", action="store_false", help="turn augmentation off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    for name in ("steps", "valid_steps", "batch_size", "dim", "layers", "heads", "lr_warmup_steps"):
        if getattr(ns, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive, got {getattr(ns, name)}",
                  file=sys.stderr)
            return 2
    try:
        metrics = train(ns)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("valid_loss_per_field", "unigram_baseline_per_field",
                                               "best_step", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
