"""Train a tiny GPT-2 on REMI tokens of a notes dataset (CPU, a few minutes).

    python -m mi_hf_remi.train data/base/bach_notes models/bach/hf-remi --steps 800

Songs of the ``train`` split are tokenized (:mod:`.remi`); every step draws random
windows of ``--seq-len`` tokens (songs weighted by length) and minimises next-token
cross-entropy with AdamW and a cosine schedule. The ``valid`` split's loss is measured
at the end. The folder gets ``config.json`` and ``model.safetensors``
(``save_pretrained``), ``miditok.json`` (the tokenizer) and ``train-log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import NotesFolder
from .remi import TOKENIZER_FILE, Vocabulary, encode_notes, make_tokenizer


def tokenize_split(tokenizer: Any, data: Path, split: str) -> list[np.ndarray]:
    """Token ids of every song of ``split``."""
    songs = NotesFolder(data, split)
    return [encode_notes(tokenizer, songs.read(n)) for n in songs.names]


def batch(songs: list[np.ndarray], size: int, length: int, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """(size, length) random windows (padded with ``pad`` where a song is shorter)."""
    weights = np.asarray([len(s) for s in songs], np.float64)
    out = np.full((size, length), pad, np.int64)
    for i, s in enumerate(rng.choice(len(songs), size, p=weights / weights.sum())):
        song = songs[s]
        start = int(rng.integers(0, max(1, len(song) - length + 1)))
        piece = song[start : start + length]
        out[i, : len(piece)] = piece
    return torch.from_numpy(out)


def loss_of(model: Any, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding targets."""
    logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, :-1]
    target = ids[:, 1:]
    keep = target != pad
    return torch.nn.functional.cross_entropy(logits[keep].float(), target[keep])


@torch.no_grad()
def evaluate(model: Any, songs: list[np.ndarray], length: int, pad: int) -> float:
    """Mean loss over consecutive windows of every song."""
    model.eval()
    total, count = 0.0, 0
    for song in songs:
        for start in range(0, max(1, len(song) - 1), length):
            ids = torch.from_numpy(song[start : start + length + 1][None])
            if ids.shape[1] < 2:
                continue
            n = ids.shape[1] - 1
            total += float(loss_of(model, ids, pad)) * n
            count += n
    model.train()
    return total / max(count, 1)


def train(data: Path, out: Path, *, steps: int, seq_len: int, batch_size: int, d_model: int,
          layers: int, heads: int, positions: int, lr: float, seed: int) -> dict[str, Any]:
    """Train and save the model (see the module docstring); returns the log."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = make_tokenizer()
    vocab = Vocabulary(tokenizer)
    train_songs = tokenize_split(tokenizer, data, "train")
    valid_songs = tokenize_split(tokenizer, data, "valid")
    config = GPT2Config(vocab_size=vocab.size, n_positions=positions, n_embd=d_model, n_layer=layers,
                        n_head=heads, bos_token_id=vocab.bos, eos_token_id=vocab.eos,
                        pad_token_id=vocab.pad, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        loss = loss_of(model, batch(train_songs, batch_size, seq_len, vocab.pad, rng), vocab.pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {np.mean(losses[-100:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
           "train_songs": len(train_songs), "train_tokens": int(sum(map(len, train_songs))),
           "final_train_loss": float(np.mean(losses[-100:])),
           "valid_loss": evaluate(model, valid_songs, min(seq_len, positions - 1), vocab.pad),
           "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(out / TOKENIZER_FILE)
    (out / "train-log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    return log


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m mi_hf_remi.train", description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path, help="notes dataset folder (data/base/bach_notes)")
    p.add_argument("out", type=Path, help="model folder to write (models/bach/hf-remi)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--positions", type=int, default=512, help="longest window the model accepts")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    log = train(a.data, a.out, steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size,
                d_model=a.d_model, layers=a.layers, heads=a.heads, positions=a.positions,
                lr=a.lr, seed=a.seed)
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
