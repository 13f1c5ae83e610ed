"""The training loader: coverage, shuffling, filters, normalisation, resume, errors."""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.errors import UserError
from music_interpret.loader import ActivationLoader
from music_interpret.preprocess import Normalizer, compute_stats, write_stats
from music_interpret.stores.mapped import NotMappable, _first_row, join_maps, map_shard, map_store
from music_interpret.stores.netcdf import check_store

from . import HOOKS, make_store, synthetic

D = 16
SHARDS = (1500, 2200, 777)
N = sum(SHARDS)
SMALL = {"block_tokens": 300, "buffer_blocks": 3}  # many blocks and buffers on little data


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return synthetic(N, D, seed=3)


@pytest.fixture(scope="module", params=["contiguous", "chunked"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          data: np.ndarray) -> tuple[Path, dict]:
    """The same data in both layouts: mapped (contiguous) and pooled (chunked) reads."""
    return make_store(tmp_path_factory.mktemp("ld") / "store", data, SHARDS, layout=request.param)


@pytest.fixture(scope="module")
def stats_path(store: tuple[Path, dict]) -> Path:
    return write_stats(compute_stats(store[0]), store[0] / "stats" / "stats.nc")


def markers(batches: list[torch.Tensor]) -> np.ndarray:
    """Token index of every delivered row (dimension 0 of the synthetic data)."""
    return torch.cat(batches)[:, 0].numpy().astype(np.int64)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ActivationLoader-prefetch"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_token_once_per_epoch(store: tuple[Path, dict], prefetch: int) -> None:
    loader = ActivationLoader(store[0], HOOKS[1], 256, seed=1, prefetch=prefetch, **SMALL)
    assert loader.n_tokens == N and loader.d_model == D and len(loader) == -(-N // 256)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(b.shape == (256, D) and b.dtype == torch.float32 for b in batches[:-1])
    assert batches[-1].shape == (N % 256, D)
    seen = markers(batches)
    assert np.array_equal(np.sort(seen), np.arange(N))
    assert not np.array_equal(seen, np.arange(N))  # shuffled
    # tokens of one batch come from several blocks, not one contiguous range
    assert np.ptp(markers(batches[:1])) > 300
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_rows_are_the_stored_activations(store: tuple[Path, dict], data: np.ndarray) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 500, **SMALL)
    rows = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(rows, data[rows[:, 0].astype(int), 0])


def test_no_shuffle_is_store_order(store: tuple[Path, dict], data: np.ndarray) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 1000, shuffle=False, **SMALL)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), data[:, 0])


def test_seeds_and_epochs(store: tuple[Path, dict]) -> None:
    def run(seed: int, **kw: object) -> list[np.ndarray]:
        return [b[:, 0].numpy().copy() for b in ActivationLoader(store[0], HOOKS[0], 512, seed=seed,
                                                                 **SMALL, **kw)]

    a, b, c = run(7), run(7, prefetch=0), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    two = ActivationLoader(store[0], HOOKS[0], 512, seed=7, epochs=2, **SMALL)
    both = [b[:, 0].numpy().copy() for b in two]
    assert len(both) == 2 * len(two)
    first, second = np.concatenate(both[: len(two)]), np.concatenate(both[len(two):])
    assert np.array_equal(first, np.concatenate(a))
    assert np.array_equal(np.sort(second), np.arange(N)) and not np.array_equal(first, second)
    # iterating the same loader again continues with the next epoch
    again = ActivationLoader(store[0], HOOKS[0], 512, seed=7, **SMALL)
    list(again)
    assert np.array_equal(np.concatenate([b[:, 0].numpy() for b in again]), second)


def test_endless(store: tuple[Path, dict]) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 1000, epochs=None, **SMALL)
    it = iter(loader)
    got = [next(it) for _ in range(2 * len(loader) + 1)]
    del it
    assert len(got) == 2 * len(loader) + 1
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 1


def test_drop_last(store: tuple[Path, dict]) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 1000, drop_last=True, **SMALL)
    batches = list(loader)
    assert len(batches) == len(loader) == N // 1000
    assert all(len(b) == 1000 for b in batches)
    assert len(np.unique(markers(batches))) == 1000 * (N // 1000)
    with pytest.raises(UserError, match="fewer than batch_size"):
        ActivationLoader(store[0], HOOKS[0], N + 1, drop_last=True)


@pytest.mark.parametrize(("filters", "select"), [
    ({"event_type": 3}, lambda c: c["event_type"] == 3),
    ({"event_type": "start-of-song"}, lambda c: c["event_type"] == 0),
    ({"instrument": [2, 5]}, lambda c: np.isin(c["instrument"], [2, 5])),
    ({"event_type": ["note", "instrument"], "instrument": 1},
     lambda c: np.isin(c["event_type"], [3, 1]) & (c["instrument"] == 1)),
])
def test_filters(store: tuple[Path, dict], filters: dict, select) -> None:
    expected = np.flatnonzero(select(store[1]))
    loader = ActivationLoader(store[0], HOOKS[1], 128, filters=filters, **SMALL)
    assert loader.n_tokens == len(expected) and len(loader) == -(-len(expected) // 128)
    seen = markers(list(loader))
    assert np.array_equal(np.sort(seen), expected)


def test_normalisation_applied(store: tuple[Path, dict], stats_path: Path, data: np.ndarray) -> None:
    for mode in ("standardize", "unit_mean_norm"):
        loader = ActivationLoader(store[0], HOOKS[1], 700, shuffle=False, normalization=mode,
                                  stats=stats_path.parent, **SMALL)
        got = torch.cat(list(loader)).numpy()
        norm = Normalizer.from_stats(stats_path, HOOKS[1], mode)
        np.testing.assert_array_equal(got, norm.apply(data[:, 1]))
        assert loader.normalizer.mode == mode
    y = got.astype(np.float64)
    assert abs(np.linalg.norm(y, axis=1).mean() - np.sqrt(D)) < 1e-4


def test_dtype(store: tuple[Path, dict]) -> None:
    batch = next(iter(ActivationLoader(store[0], HOOKS[0], 64, dtype=torch.bfloat16)))
    assert batch.dtype == torch.bfloat16 and batch.shape == (64, D)


@pytest.mark.parametrize("stop", [0, 1, 4, 9, 12, 13, 16])
def test_resume_mid_epoch(store: tuple[Path, dict], stop: int) -> None:
    kw = dict(seed=5, filters={"event_type": [1, 3]}, **SMALL)
    reference = [b.numpy().copy() for b in ActivationLoader(store[0], HOOKS[0], 300, epochs=2, **kw)]
    first = ActivationLoader(store[0], HOOKS[0], 300, epochs=2, **kw)
    assert len(reference) == 2 * len(first) == 26
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    del it
    assert (state["epoch"], state["position"]) == divmod(stop, len(first))
    resumed = ActivationLoader(store[0], HOOKS[0], 300, epochs=2 - state["epoch"], **kw)
    resumed.load_state_dict(state)
    tail = [b.numpy() for b in resumed]
    assert len(tail) == len(reference) - stop
    for got, want in zip(tail, reference[stop:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_state_dict_checks(store: tuple[Path, dict]) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 300, **SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        loader.load_state_dict({**loader.state_dict(), "batch_size": 299})
    loader.load_state_dict({"epoch": 3, "position": len(loader)})
    assert loader.state_dict()["epoch"] == 4 and loader.state_dict()["position"] == 0


def test_errors(store: tuple[Path, dict], stats_path: Path, tmp_path: Path) -> None:
    path = store[0]
    with pytest.raises(UserError, match=r"hook point 'resid_post.9' was not extracted"):
        ActivationLoader(path, "resid_post.9")
    with pytest.raises(UserError, match=r"filters .*'event_type': 3.*'instrument': 99.* select no"):
        ActivationLoader(path, HOOKS[0], filters={"event_type": 3, "instrument": 99})
    with pytest.raises(UserError, match=r"unknown coordinate\(s\) 'velocity' \(known: song, "):
        ActivationLoader(path, HOOKS[0], filters={"velocity": 3})
    with pytest.raises(UserError, match="'chord' is not an event type"):
        ActivationLoader(path, HOOKS[0], filters={"event_type": "chord"})
    with pytest.raises(UserError, match="'standardize' needs statistics"):
        ActivationLoader(path, HOOKS[0], normalization="standardize")
    with pytest.raises(UserError, match="not a mode"):
        ActivationLoader(path, HOOKS[0], normalization="l2", stats=stats_path)
    other, _ = make_store(tmp_path / "other", synthetic(200, D), [200])
    foreign = write_stats(compute_stats(other), tmp_path / "foreign.nc")
    with pytest.raises(UserError, match=r"foreign.nc: statistics belong to store .* not to "):
        ActivationLoader(path, HOOKS[0], normalization="standardize", stats=foreign)
    with pytest.raises(UserError, match="not an activation store"):
        ActivationLoader(tmp_path, HOOKS[0])


def _wait_no_threads(before: int) -> bool:
    for _ in range(100):
        gc.collect()
        if len(prefetch_threads()) <= before:
            return True
        time.sleep(0.02)
    return False


def test_prefetch_thread_terminates(store: tuple[Path, dict]) -> None:
    before = len(prefetch_threads())
    loader = ActivationLoader(store[0], HOOKS[0], 64, prefetch=2, **SMALL)
    list(loader)  # exhausted
    assert _wait_no_threads(before)
    for batch in loader:  # abandoned after one batch
        assert len(batch) == 64
        break
    assert _wait_no_threads(before)
    it = iter(loader)
    next(it)
    assert len(prefetch_threads()) > before  # reader and batcher threads
    loader.close()  # explicit stop while the consumer still holds the iterator
    assert _wait_no_threads(before)
    del it


def test_producer_error_reaches_consumer(store: tuple[Path, dict], monkeypatch) -> None:
    loader = ActivationLoader(store[0], HOOKS[0], 64, prefetch=2, mmap=False, **SMALL)

    def broken(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("music_interpret.stores.blocks.BlockReader.pieces", broken)
    before = len(prefetch_threads())
    with pytest.raises(OSError, match="disk gone"):
        list(loader)
    assert _wait_no_threads(before)


def test_reads_in_pieces(store: tuple[Path, dict], stats_path: Path, data: np.ndarray,
                         monkeypatch) -> None:
    """Blocks spanning several chunk-aligned read pieces, with filters and normalisation."""
    monkeypatch.setattr("music_interpret.stores.blocks.BlockReader.PIECE_BYTES", 1)  # 1 chunk
    mask = np.isin(store[1]["event_type"], [0, 3])
    loader = ActivationLoader(store[0], HOOKS[1], 100, shuffle=False, filters={"event_type": [0, 3]},
                              normalization="standardize", stats=stats_path, block_tokens=700,
                              mmap=False)
    got = torch.cat(list(loader)).numpy()
    norm = Normalizer.from_stats(stats_path, HOOKS[1], "standardize")
    np.testing.assert_allclose(got, norm.apply(data[mask, 1]), rtol=1e-6, atol=1e-6)
    plain = ActivationLoader(store[0], HOOKS[1], 100, shuffle=False, block_tokens=700, mmap=False)
    np.testing.assert_array_equal(torch.cat(list(plain)).numpy(), data[:, 1])


def test_both_layouts_are_mapped(store: tuple[Path, dict], monkeypatch, tmp_path: Path) -> None:
    assert ActivationLoader(store[0], HOOKS[0], 64).mapped
    assert ActivationLoader(store[0], HOOKS[0], 64, mmap=True).mapped
    assert not ActivationLoader(store[0], HOOKS[0], 64, mmap=False).mapped

    def refuse(info: object) -> None:
        raise NotMappable("shard-00000.nc: activations are filtered or compressed")

    monkeypatch.setattr("music_interpret.stores.mapped.map_store", refuse)
    assert not ActivationLoader(store[0], HOOKS[0], 64).mapped  # falls back to pooled reads
    with pytest.raises(UserError, match="mmap: shard-00000.nc: activations are filtered"):
        ActivationLoader(store[0], HOOKS[0], 64, mmap=True)


def test_compressed_activations_are_not_mapped_reordered_chunks_are(tmp_path: Path) -> None:
    import netCDF4

    acts = synthetic(300, D, n_hooks=1)
    for name, kw in (("zlib", {"zlib": True, "chunksizes": (100, 1, D)}),
                     ("whole", {"chunksizes": (100, 1, D // 2)})):
        path = tmp_path / f"{name}.nc"
        with netCDF4.Dataset(path, "w") as nc:
            for dim, size in zip(("token", "hook", "d_model"), acts.shape, strict=True):
                nc.createDimension(dim, size)
            nc.createVariable("activations", "f4", ("token", "hook", "d_model"), **kw)[:] = acts
        with pytest.raises(NotMappable, match=str(path)):
            map_shard(path, 300, 1, D)
    path = tmp_path / "reordered.nc"
    with netCDF4.Dataset(path, "w") as nc:
        for dim, size in zip(("token", "hook", "d_model"), acts.shape, strict=True):
            nc.createDimension(dim, size)
        var = nc.createVariable("activations", "f4", ("token", "hook", "d_model"), chunksizes=(64, 1, D))
        for start in (256, 0, 128, 192, 64):  # chunks allocated out of token order
            var[start : start + 64] = acts[start : start + 64]
            nc.sync()
    mapped = map_shard(path, 300, 1, D)  # chunks out of order still map, row by row
    tokens = np.arange(300)
    np.testing.assert_array_equal(mapped.rows[mapped.row_index(tokens, 0)], acts[:, 0])


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("options", [
    {},
    {"filters": {"event_type": "note", "instrument": [1, 2, 5]}, "normalization": "standardize"},
    {"normalization": "unit_mean_norm", "drop_last": True, "block_tokens": 1000, "buffer_blocks": 1},
])
def test_mapped_and_pooled_batches_identical(store: tuple[Path, dict], stats_path: Path,
                                             hook: str, options: dict) -> None:
    """The two paths deliver bitwise the same batches (order inside a batch included)."""
    kw = {**SMALL, "stats": stats_path if "normalization" in options else None, **options}
    for epoch_seed in (0, 5):
        mapped = ActivationLoader(store[0], hook, 250, seed=epoch_seed, mmap=True, **kw)
        pooled = ActivationLoader(store[0], hook, 250, seed=epoch_seed, mmap=False, **kw)
        a, b = list(mapped), list(pooled)
        assert len(a) == len(b) == len(mapped)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_mapped_resume_matches(store: tuple[Path, dict]) -> None:
    """Resuming the mapped path mid-epoch continues with the pooled path's batches."""
    full = list(ActivationLoader(store[0], HOOKS[0], 128, seed=2, mmap=False, **SMALL))
    loader = ActivationLoader(store[0], HOOKS[0], 128, seed=2, mmap=True, **SMALL)
    loader.load_state_dict({"epoch": 0, "position": 7})
    rest = list(loader)
    assert len(rest) == len(full) - 7
    for x, y in zip(rest, full[7:], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batch_memory_not_reused_while_referenced(store: tuple[Path, dict], prefetch: int) -> None:
    """Batches (or views of them) kept by the consumer are never overwritten by later ones."""
    expected = [b.clone() for b in ActivationLoader(store[0], HOOKS[0], 200, seed=4, **SMALL)]
    loader = ActivationLoader(store[0], HOOKS[0], 200, seed=4, prefetch=prefetch, **SMALL)
    kept_views, kept_arrays, n = [], [], 0
    for i, batch in enumerate(loader):
        if i % 3 == 0:
            kept_views.append((i, batch[:7]))  # a torch view only
        elif i % 3 == 1:
            kept_arrays.append((i, batch.numpy()[:, :3]))  # a numpy view only
        n += 1
    assert n == len(expected)
    for i, view in kept_views:
        assert torch.equal(view, expected[i][:7])
    for i, arr in kept_arrays:
        np.testing.assert_array_equal(arr, expected[i].numpy()[:, :3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="joined maps are Linux only")
@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_joined_and_per_shard_gathers_identical(tmp_path: Path, data: np.ndarray, layout: str,
                                                monkeypatch) -> None:
    """One gather from the joined shards, or one per shard: bitwise the same batches.

    (Chunks of 64 KiB or more are aligned to 4 KiB and are mapped into the joined
    range; the smaller, unaligned chunks of the ``store`` fixture are copied into it.)
    """
    path, _ = make_store(tmp_path / "s", data, SHARDS, layout=layout, chunk_tokens=1024)
    joined = ActivationLoader(path, HOOKS[1], 300, seed=6, **SMALL)
    assert joined._rows_space()[0] is not None
    expected = list(joined)

    def refuse(maps: object) -> None:
        raise NotMappable("joined maps need 64-bit Linux")

    monkeypatch.setattr("music_interpret.loader.mapped.join_maps", refuse)
    per_shard = ActivationLoader(path, HOOKS[1], 300, seed=6, **SMALL)
    assert per_shard.mapped and per_shard._rows_space()[0] is None
    got = list(per_shard)
    assert len(got) == len(expected)
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="joined maps are Linux only")
@pytest.mark.parametrize(("d_model", "layout"), [(24, "contiguous"), (1024, "chunked")])
def test_join_maps_rows_equal_each_shards_map(tmp_path: Path, d_model: int, layout: str) -> None:
    """Rows that do not divide the page size; a last shard too small to be aligned (copied)."""
    sizes = (800, 700, 5)  # the first two hold 64 KiB or more: aligned
    acts = synthetic(sum(sizes), d_model, seed=d_model)
    path, _ = make_store(tmp_path / "s", acts, sizes, layout=layout, chunk_tokens=64)
    maps = map_store(check_store(path))
    assert [m.rows.offset % 4096 == 0 for m in maps] == [True, True, False]
    joined = join_maps(maps)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for k, m in enumerate(maps):
        for h in range(2):
            tokens = np.arange(sizes[k])
            got = joined.rows[joined.first[k] + m.row_index(tokens, h)]
            np.testing.assert_array_equal(got, acts[starts[k] : starts[k + 1], h])
    with pytest.raises(NotMappable, match="too many to copy"):
        join_maps(maps, max_copy_bytes=100)


def test_first_row_solves_the_congruence() -> None:
    """Smallest row >= lower whose byte offset is congruent to the target (or None)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        row_bytes = int(rng.choice([64, 96, 2048, 3072, 4 * 769]))
        modulus = int(rng.choice([4096, 1 << 16]))  # (a huge page: the same arithmetic)
        target, lower = int(rng.integers(0, 1 << 24)), int(rng.integers(0, 5000))
        got = _first_row(row_bytes, target, modulus, lower)
        brute = next((r for r in range(lower, lower + modulus + 1)
                      if (r * row_bytes - target) % modulus == 0), None)
        assert got == brute, (row_bytes, target, modulus, lower)


@pytest.mark.parametrize("mmap", [True, False])
def test_shuffle_run_keeps_runs_of_neighbours(store: tuple[Path, dict], mmap: bool) -> None:
    """Runs of consecutive tokens, shuffled: every token once, most batch rows follow their
    predecessor, both paths bitwise equal; a state saved with another run length is refused."""
    kw = {**SMALL, "seed": 3, "shuffle_run": 8}
    batches = list(ActivationLoader(store[0], HOOKS[0], 256, mmap=mmap, **kw))
    got = markers(batches)
    assert np.array_equal(np.sort(got), np.arange(N))
    steps = np.concatenate([np.diff(markers([b])) for b in batches])
    assert (steps == 1).mean() > 0.8  # 7 of 8 inside a run, bar block and carry boundaries
    assert (steps != 1).sum() > N / 8 * 0.8  # and the runs are shuffled
    other = list(ActivationLoader(store[0], HOOKS[0], 256, mmap=not mmap, **kw))
    for x, y in zip(batches, other, strict=True):
        assert torch.equal(x, y)
    loader = ActivationLoader(store[0], HOOKS[0], 256, **kw)
    state = loader.state_dict()
    assert state["shuffle_run"] == 8
    with pytest.raises(ValueError, match="shuffle_run=8"):
        ActivationLoader(store[0], HOOKS[0], 256, seed=3, **SMALL).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_run must be positive"):
        ActivationLoader(store[0], HOOKS[0], 256, shuffle_run=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="joined maps are Linux only")
def test_small_last_shard_keeps_an_odd_width_store_mapped(tmp_path: Path) -> None:
    """d_model 768 (3 KiB rows do not divide 4 KiB): big chunked shards and a last shard
    smaller than one chunk (stored contiguous) still map and join."""
    sizes = (2048, 100)
    acts = synthetic(sum(sizes), 768, seed=1)
    path, _ = make_store(tmp_path / "s", acts, sizes, layout="chunked", chunk_tokens=1024)
    maps = map_store(check_store(path))
    assert [m.chunk for m in maps] == [1024, 0]
    loader = ActivationLoader(path, HOOKS[1], 300, seed=2)
    assert loader.mapped and loader._rows_space()[0] is not None
    got = torch.cat(list(loader)).numpy()
    order = got[:, 0].astype(np.int64)
    np.testing.assert_array_equal(np.sort(order), np.arange(sum(sizes)))
    np.testing.assert_array_equal(got, acts[order, 1])
