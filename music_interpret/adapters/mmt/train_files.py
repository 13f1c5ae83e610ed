"""What an MMT training run reads and writes: the corpus (train notes, encoded validation
songs and their fingerprint), ``train-args.json`` in MMT's format, ``train-run.json`` (what
made the folder, checked before a run continues) and atomic checkpoints in MMT's format
(used by :mod:`.training`, whose module doc describes the folder)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UserError
from ...jsonio import write_json_atomic
from . import representation as rep
from .dataset import NoteDataset, open_dataset

if TYPE_CHECKING:
    import torch

    from .training import TrainOptions

MADE_BY = "music_interpret.adapters.mmt.train_demo"
RUN_FORMAT = 1
RUN_FILE = "train-run.json"
METRICS_FILE = "metrics.json"
BEST = Path("checkpoints") / "best_model.pt"
LAST = Path("checkpoints") / "last.pt"
# Options that may differ when a run is continued: they change neither the model nor
# the data order (only speed, bitwise roundings, where to stop, or the stored dtype).
RESUMABLE = ("steps", "patience", "min_delta", "device", "threads", "checkpoint_steps",
             "eval_batch_size", "save_dtype")  # fmt: skip


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
        "patience": opts.patience, "min_delta": opts.min_delta, "precision": precision,
        "save_dtype": opts.save_dtype,
        "length_pool": opts.length_pool,
    }  # fmt: skip
