"""Reliability of extraction on real MMT fixtures: full disks, broken checkpoints, corrupted
shards, changed inputs, long songs, odd file names and the seed command's stores."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import music_interpret as mi
from music_interpret.errors import UserError
from music_interpret.stores.netcdf import check_store
from tests.conftest import run_cli

from .conftest import FIX, write_pipeline

TINY = FIX / "models" / "bach" / "ape-tiny"


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (root only; skips the test otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file taking all free space of ``folder``'s file system but ``leave`` bytes."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    ds = mi.open_activations(path, lazy=False)
    return {k: ds[k].values for k in ("activations", "song", "pitch", "beat", "seq_pos")}


def test_disk_full_during_extract_then_resume(tmp_path: Path) -> None:
    """One line naming the shard, no temporaries, the complete shards kept, a manifest that
    says failed; with space again the same command resumes to the same store."""
    extract = "layers: [0, 1]\nstore: {name: netcdf, shard_tokens: 1200}"
    reference = write_pipeline(tmp_path, extract=extract, run="ref")
    assert run_cli("run", str(reference)).returncode == 0
    expected = store_arrays(tmp_path / "acts" / "ref")
    shard_bytes = (tmp_path / "acts" / "ref" / "shard-00000.nc").stat().st_size
    with tmpfs(tmp_path / "small", 8192) as disk:
        path = disk / "p.yaml"
        path.write_text(textwrap.dedent(f"""
            run: full
            output_dir: {disk / 'reports'}
            stages: [extract]
            model: {{path: {TINY}}}
            data: {{path: {FIX / 'data' / 'quartets' / 'processed'}}}
            extract:
              layers: [0, 1]
              store: {{name: netcdf, shard_tokens: 1200}}
              output: {disk / 'acts'}
        """))
        filler = fill(disk, leave=int(1.5 * shard_bytes) + 128 * 1024)  # room for one shard
        result = run_cli("run", str(path))
        assert result.returncode == 1, result.stderr
        lines = errors(result)
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert lines[0].startswith(f"error: no space left on device while writing {disk / 'acts.partial'}")
        partial = disk / "acts.partial"
        assert not list(partial.glob(".*.tmp")) and not list(disk.rglob("*.tmp"))
        listed = json.loads((partial / "store.json").read_text())["shards"]
        assert len(listed) >= 1
        manifest = json.loads((disk / "reports" / "full" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and manifest["stages"]["extract"]["status"] == "failed"
        filler.unlink()
        resumed = run_cli("run", str(path))
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming after {len(listed)} complete shard(s)" in resumed.stderr
        got = store_arrays(disk / "acts")
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_nan_checkpoint_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    state = torch.load(model / "checkpoints" / "best_model.pt", weights_only=True)
    key = next(k for k in state if k.endswith("to_q.weight"))
    state[key][0, 0] = float("nan")
    torch.save(state, model / "checkpoints" / "best_model.pt")
    path = write_pipeline(tmp_path)
    path.write_text(path.read_text().replace(str(TINY), str(model)))
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert errors(result) == [f"error: {model / 'checkpoints' / 'best_model.pt'}: tensor {key!r} holds "
                              "1 NaN or infinite value(s); the checkpoint is broken (a diverged or "
                              "corrupted training run?)"]
    assert not list((tmp_path / "acts").iterdir())  # neither a store nor a partial one


def test_non_finite_activations_name_the_hook_and_song(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations are checked as they are written (here the model overflows on one song)."""
    from music_interpret.adapters.mmt.adapter import MMTAdapter
    from music_interpret.config import load_pipeline
    from music_interpret.engine import Engine
    from music_interpret.plugins import PluginRegistry

    real = MMTAdapter.run_with_hooks

    def overflowing(self, batch, hooks):  # noqa: ANN001, ANN202
        out = real(self, batch, hooks)
        if batch.codes.shape[1] > 600:  # only the longest windows
            out["resid_post.1"][0, 5] = float("inf")
        return out

    monkeypatch.setattr(MMTAdapter, "run_with_hooks", overflowing)
    registry = PluginRegistry(autoload=False)
    pipeline = load_pipeline(write_pipeline(tmp_path, extract="layers: [1]\nforward_workers: 1"), registry)
    with pytest.raises(UserError) as err:
        Engine(pipeline, registry, log=lambda msg: None).run()
    message = str(err.value)
    assert "\n" not in message
    assert "have NaN or infinite activations at hook point resid_post.1" in message
    song = message.split("of song ")[1].split(" have")[0].strip("'")
    assert (FIX / "data" / "quartets" / "processed" / "notes" / f"{song}.npy").exists()


def test_shard_checksums_catch_changed_bytes(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, extract="layers: [0]\nstore: {name: netcdf, shard_tokens: 1500}")
    assert run_cli("run", str(path)).returncode == 0
    store = tmp_path / "acts" / "x"
    entries = json.loads((store / "store.json").read_text())["shards"]
    assert all(e["checksum"].startswith(("xxh3_128:", "sha256:")) for e in entries)
    check_store(store, verify_checksums=True)
    mi.open_activations(store, verify=True)
    shard = store / entries[1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the activations
    shard.write_bytes(bytes(data))
    check_store(store)  # the structure is intact: only the checksum tells
    for call in (lambda: check_store(store, verify_checksums=True),
                 lambda: mi.open_activations(store, verify=True)):
        with pytest.raises(UserError, match=f"{shard}: the file changed after it was written"):
            call()


def test_changed_input_with_same_size_and_mtime_reruns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIX / "data" / "quartets" / "processed", data)
    path = write_pipeline(tmp_path, extract="layers: [0]")
    path.write_text(path.read_text().replace(str(FIX / "data" / "quartets" / "processed"), str(data)))
    assert run_cli("run", str(path)).returncode == 0
    song = data / "notes" / "mozart_k155_m3.npy"
    notes = np.load(song)
    stat = song.stat()
    notes[0, 2] += 1  # one pitch up: same size
    np.save(song, notes)
    os.utime(song, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert song.stat().st_size == stat.st_size and song.stat().st_mtime_ns == stat.st_mtime_ns
    again = run_cli("run", str(path))
    assert again.returncode == 0
    assert "extract: done" in again.stderr and "skipped" not in again.stderr


def test_seed_store_next_to_a_pipeline_run_is_kept(tmp_path: Path) -> None:
    """``run: bach`` publishes to data/activations/bach, the parent of the seed command's
    store data/activations/bach/tiny: refused, the store survives."""
    root = tmp_path / "proj"
    (root / "data" / "base").mkdir(parents=True)
    (root / "models" / "bach").mkdir(parents=True)
    shutil.copytree(FIX / "data" / "bach" / "processed", root / "data" / "base" / "bach_notes")
    shutil.copytree(TINY, root / "models" / "bach" / "tiny")
    seed = subprocess.run([os.sys.executable, "-m", "music_interpret.activation_extraction", "bach",
                           "tiny", "--layers", "0", "--max-songs", "3", "--root", str(root)],
                          capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr
    store = root / "data" / "activations" / "bach" / "tiny"
    before = sorted(p.name for p in store.iterdir())
    pipeline = root / "pipeline.yaml"
    pipeline.write_text("run: bach\nstages: [extract]\nmodel: {path: models/bach/tiny}\n"
                        "data: {path: data/base/bach_notes}\nextract: {layers: [0], max_songs: 2}\n")
    for command in ("validate", "run"):
        result = run_cli(command, str(pipeline))
        assert result.returncode == 2
        assert errors(result) == [
            f"error: extract: {root / 'data' / 'activations' / 'bach'} exists and was not written by "
            "stage 'extract' (no .stage.json); refusing to replace it: choose another output folder "
            "or move it away"]
    assert sorted(p.name for p in store.iterdir()) == before
    check_store(store, verify_checksums=True)


def test_songs_longer_than_the_beat_range_and_named_errors(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    long = np.array([(b, 0, 60 + b % 12, 12, 40) for b in range(0, 3000, 2)], np.int64)
    np.save(notes / "long.npy", long)
    np.save(notes / "short.npy", long[:60])
    path = write_pipeline(tmp_path, extract="layers: [0]")
    path.write_text(path.read_text().replace(str(FIX / "data" / "quartets" / "processed"), str(notes)))
    result = run_cli("run", str(path))
    assert result.returncode == 0, result.stderr
    ds = mi.open_activations(tmp_path / "acts" / "x")
    beats = ds.beat.values[(ds.song.values == list(ds.song_name.values).index("long")) & (ds.event_type.values == 3)]
    np.testing.assert_array_equal(beats, long[:, 0])  # every note, beats far past 1024
    bad = long[:60].copy()
    bad[3, 1] = 12  # a 13th position in a beat of 12
    np.save(notes / "short.npy", bad)
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert errors(result) == [f"error: notes file {notes / 'short.npy'}: position 12 in row 3 exceeds 11 "
                              "(onsets are in 1/12 of a beat)"]


def test_non_utf8_file_name_in_the_data_folder(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    song = np.array([(b, 0, 60, 12, 40) for b in range(60)], np.int64)
    np.save(notes / "fine.npy", song)
    np.save(os.fsdecode(bytes(notes) + b"/caf\xe9.npy"), song)
    path = write_pipeline(tmp_path, extract="layers: [0]")
    path.write_text(path.read_text().replace(str(FIX / "data" / "quartets" / "processed"), str(notes)))
    for command in ("validate", "run"):
        result = run_cli(command, str(path))
        assert result.returncode == 2, result.stderr
        assert errors(result) == [f"error: data.path: notes file {notes}/caf\\xe9.npy: the file name is "
                                  "not valid UTF-8; rename it (song names are stored as text)"]


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    args = json.loads((model / "train-args.json").read_text())
    args["max_seq_len"] = 10**12
    (model / "train-args.json").write_text(json.dumps(args))
    path = write_pipeline(tmp_path)
    path.write_text(path.read_text().replace(str(TINY), str(model)))
    for command in ("validate", "run"):
        result = run_cli(command, str(path))
        assert result.returncode == 2
        (line,) = errors(result)
        assert f"{model / 'train-args.json'}: the model it describes" in line
        assert "max_seq_len 1000000000000" in line and "needs about" in line and "available" in line
