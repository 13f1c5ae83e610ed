"""Training that survives full disks and damaged checkpoints, and counts its tokens honestly."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from music_interpret.engine import write_manifest
from music_interpret.errors import DiskFull, UserError
from music_interpret.learners.dictionary import Dictionary
from music_interpret.learners.io import load_dictionary, save_dictionary
from music_interpret.learners.sae import ReluL1Config, ReluL1Learner
from music_interpret.learners.trainer import Trainer, TrainSettings
from music_interpret.loader import ActivationLoader
from tests.conftest import run_cli
from tests.extract.test_reliability import fill, tmpfs

from .conftest import HOOKS, pipeline

STEPS, EVERY, BATCH = 24, 8, 64


class Loader:
    """The real loader; ``hook(n)`` is called before batch ``n`` (1-based) is handed out."""

    def __init__(self, store: Path, hook: Callable[[int], None] | None = None) -> None:
        self.inner = ActivationLoader(store, HOOKS[0], BATCH, drop_last=True, epochs=None, prefetch=0, seed=0)
        self.d_model, self.n, self.hook = self.inner.d_model, 0, hook

    def __iter__(self):  # noqa: ANN204
        for x in self.inner:
            self.n += 1
            if self.hook is not None:
                self.hook(self.n)
            yield x

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def train(store: Path, ckpt: Path, hook: Callable[[int], None] | None = None) -> object:
    torch.manual_seed(0)
    learner = ReluL1Learner(ReluL1Config(d_sae=32, batch_size=BATCH, lr=1e-3))
    sample = next(iter(ActivationLoader(store, HOOKS[0], 512, shuffle=False, prefetch=0)))
    trainer = Trainer(learner, Loader(store, hook), TrainSettings(steps=STEPS, log_every=4, checkpoint_every=EVERY),
                      checkpoint=ckpt, tb_dir=None, init_sample=lambda: sample)
    return trainer.run()


def test_disk_full_at_a_checkpoint_then_resume(tmp_path: Path, store: Path) -> None:
    reference = train(store, tmp_path / "ref" / "ckpt.pt")
    with tmpfs(tmp_path / "small", 1024) as disk:
        ckpt = disk / "ckpt.pt"
        filler: list[Path] = []

        def full_after_first_checkpoint(n: int) -> None:
            if n == EVERY + 2 and not filler:
                filler.append(fill(disk, leave=1024))

        with pytest.raises(DiskFull) as err:
            train(store, ckpt, full_after_first_checkpoint)
        assert str(err.value) == f"no space left on device while writing {ckpt}"
        assert sorted(p.name for p in disk.iterdir()) == ["ckpt.pt", "filler"]  # no temporaries
        assert torch.load(ckpt, weights_only=True)["step"] == EVERY  # the last good one
        filler[0].unlink()
        resumed = train(store, ckpt)
    assert resumed.tokens == reference.tokens == STEPS * BATCH  # all of them, not only since the resume
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(resumed.model, key), getattr(reference.model, key)), key


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, store: Path) -> None:
    reference = train(store, tmp_path / "ref" / "ckpt.pt")
    ckpt = tmp_path / "run" / "ckpt.pt"

    def stop(n: int) -> None:
        if n == 2 * EVERY + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(store, ckpt, stop)
    assert torch.load(ckpt, weights_only=True)["step"] == 2 * EVERY
    assert torch.load(ckpt.with_name("ckpt.pt.prev"), weights_only=True)["step"] == EVERY
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a crash of the file system
    resumed = train(store, ckpt)
    assert resumed.tokens == STEPS * BATCH
    assert torch.equal(resumed.model.W_enc, reference.model.W_enc)
    # both damaged: one line saying how to start afresh
    ckpt.write_bytes(b"garbage")
    ckpt.with_name("ckpt.pt.prev").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"damaged checkpoint and no usable earlier one; rerun with --force"):
        train(store, ckpt)


def test_manifest_is_written_in_place_when_the_disk_is_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 256) as disk:
        path = disk / "manifest.json"
        write_manifest(path, {"status": "running", "stages": {"train": {"status": "running"}}})
        size = path.stat().st_size
        fill(disk, leave=0)
        with pytest.raises(DiskFull, match="no space left on device while writing .*weights.safetensors"):
            save_dictionary(disk / "dict", Dictionary(4, 8), {})
        final = {"status": "failed", "error": "DiskFull: no space left on device while writing x",
                 "stages": {"train": {"status": "failed"}}}
        write_manifest(path, final)
        assert json.loads(path.read_text()) == final and path.stat().st_size == size
        assert not [p for p in disk.iterdir() if p.name.startswith(".")]


def test_truncated_weights_are_one_line(tmp_path: Path) -> None:
    folder = save_dictionary(tmp_path / "d", Dictionary(8, 16), {})
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as err:
        load_dictionary(folder)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{weights}: unreadable weights, truncated or damaged")


def test_a_dictionary_too_large_for_memory_is_refused_by_validate(tmp_path: Path, store: Path) -> None:
    path = pipeline(tmp_path, store, "learner: {name: relu_l1, d_sae: 10000000000}\nsteps: 5")
    for command in ("validate", "run"):
        result = run_cli(command, str(path), env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 2, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith("error: train.learner.d_sae: 1 dictionary(ies) of 10,000,000,000 latents "
                               "on 16-dimensional activations")
        assert "needs about" in line and "available" in line
    assert not (tmp_path / "reports" / "r" / "train.partial").exists()
    assert os.path.exists(store)
