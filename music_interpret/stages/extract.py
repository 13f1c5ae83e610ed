"""The ``extract`` stage: run the model over the dataset and store activations.

Songs are grouped into shards of about ``shard_tokens`` stored tokens. Inside a
shard, the songs' windows are sorted by length and cut into batches of similar
lengths (:func:`length_batches`: little padding), which the forward workers take in
turn; the activations of the tokens each window owns are scattered back into song
order and the shard is written in one go. Three things overlap: the forward passes
of shard k, the planning (reading, tokenizing, windowing) of shard k+1 and the
writing of shard k-1. Memory therefore holds two shards' activations and one plan,
whatever the dataset size. After a crash the store's manifest lists the
complete shards; the next run with the same configuration continues after the
last of them, and because batches never cross a shard boundary the result is
bitwise the one an uninterrupted run writes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config import Pipeline
from ..errors import UserError
from ..interfaces import Stage
from .extract_config import HOOK_RE, ExtractConfig  # noqa: F401 - re-exported
from .extract_plan import (  # noqa: F401 - cut_shards, ShardSpec, length_batches re-exported
    ShardPlan,
    ShardSpec,
    SongPlanner,
    cut_shards,
    default_plan_workers,
    length_batches,
    shard_batches,
    take_shard,
)

if TYPE_CHECKING:
    from ..context import StageContext
    from ..interfaces import ModelAdapter
    from ..plugins import PluginRegistry

class ExtractStage(Stage):
    """Run the model over the note dataset and store activations with musical coordinates."""

    name = "extract"
    description = "Extract hook-point activations of every token into an activation store."
    Config = ExtractConfig
    requires: ClassVar[tuple[str, ...]] = ("model", "data")
    distributed = True  # under torchrun each rank writes its share of the shards

    @staticmethod
    def output_dir(pipeline: Pipeline, config: ExtractConfig) -> Path:
        if config.output is not None:
            return config.output
        base = pipeline.source.parent if pipeline.source else Path.cwd()
        return base / "data" / "activations" / pipeline.header.run

    def check(self, pipeline: Pipeline, registry: PluginRegistry) -> list[str]:
        """The model folder and its hook points, the dataset's song list, before anything runs."""
        from ..resources import resolve_device

        header = pipeline.header
        if header.model is None or header.data is None:
            return []
        problems = []
        adapter = header.model.adapter.build(registry)
        try:
            info = adapter.describe(header.model.path, resolve_device(header.device))
        except NotImplementedError:
            info = None
        except UserError as exc:
            problems.append(f"model.path: {exc}")
            info = None
        if info is not None:
            layers = sum(h.startswith("resid_post.") for h in info.hook_points)
            bad = [layer for layer in self.config.layers if layer >= layers]
            if bad:
                problems.append(f"extract.layers: layer(s) {', '.join(map(str, bad))} do not exist "
                                f"(the model has {layers} layers: 0-{layers - 1})")
            missing = [h for h in self.config.hooks if h not in info.hook_points]
            if missing:
                problems.append(f"extract.hooks: {', '.join(missing)} do not exist in this model "
                                f"(available: {', '.join(info.hook_points)})")
        try:
            if header.data.format == "notes":  # other formats: checked by preflight, converted by the run
                adapter.open_dataset(header.data.path, header.data.split)
        except NotImplementedError:
            pass
        except UserError as exc:
            problems.append(f"data.path: {exc}")
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        header = ctx.pipeline.header
        assert header.model is not None and header.data is not None
        cfg: ExtractConfig = self.config
        adapter = ctx.model_adapter()
        dataset = adapter.open_dataset(header.data.path, header.data.split)
        adapter.check_dataset(dataset)
        vocabulary = adapter.event_vocabulary()
        self._note = vocabulary.note
        hooks = cfg.hook_points(adapter.hook_points())
        names = list(dataset.names)
        if cfg.shuffle_songs:  # a seeded order: the first songs (or tokens) are a random sample
            names = [names[i] for i in np.random.default_rng(ctx.seed).permutation(len(names))]
        names = names[: cfg.max_songs]
        self._names, self._dtype = names, getattr(adapter.config, "dtype", "float32")
        sources = [dataset.source(n) for n in names]
        store = cfg.store.build(ctx.registry)
        attrs = {
            "source": f"{header.model.adapter.name} adapter; checkpoint {header.model.path} "
                      f"sha256 {adapter.checkpoint_sha256}",
            "history": f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                       f"music_interpret extract ({' '.join(sys.argv)})",
            "music_interpret_version": _version(),
            "model_config": adapter.model_config,
            "model_sha256": adapter.checkpoint_sha256,
            "dataset": str(dataset.location),
            "model_adapter": header.model.adapter.name,
            "model_path": str(Path(header.model.path).resolve()),
            "data_path": str(Path(header.data.path).resolve()),
            "split": dataset.split or "all",
            "events": cfg.events,
            "pipeline_config": json.dumps(_jsonable(ctx.pipeline.raw)),
            "instrument_names": list(vocabulary.instruments),
            "event_vocabulary": vocabulary.to_json(),
            "fingerprint": ctx.fingerprint,
        }
        extra = {"dtype": cfg.dtype} if cfg.dtype != "float32" else {}
        shard_tokens = store.tokens_per_shard(len(hooks), adapter.d_model)
        create = {"hooks": hooks, "d_model": adapter.d_model, "songs": names, "sources": sources,
                  "attrs": attrs, "resume": True, **extra}
        stats = {"tokens": 0, "windows": 0, "dropped_notes": 0, "forward_seconds": 0.0}
        t0 = time.perf_counter()
        workers = cfg.plan_workers if cfg.plan_workers is not None else default_plan_workers(ctx.device)
        planner = SongPlanner(adapter, dataset, names, notes_only=cfg.events == "notes",
                              note=self._note, stride=cfg.stride, workers=workers,
                              adapter_ref=header.model.adapter, model_path=Path(header.model.path),
                              data=(Path(header.data.path), header.data.split))
        try:
            if ctx.dist.enabled:
                writer = self._extract_ranked(ctx, adapter, store, create, shard_tokens, stats, planner)
            else:
                writer = store.create(ctx.work_dir, **create)
                start = writer.next_song
                if start:
                    print(f"extract: resuming after {writer.n_shards} complete shard(s), at song "
                          f"{start}/{len(names)}", file=sys.stderr)
                songs = planner.plans(range(start, len(names)))

                def upcoming(_: ShardPlan | None) -> ShardPlan | None:
                    return take_shard(songs, stats, shard_tokens=shard_tokens)

                self._extract(ctx, adapter, hooks, upcoming, writer.write_shard, stats, len(names) - start)
        finally:
            planner.close()
        if not ctx.dist.main:
            return {}
        if not writer.n_shards:
            raise UserError(f"extract: no tokens selected from {dataset.location} (events={cfg.events})")
        seconds = time.perf_counter() - t0
        summary = {
            "store": str(ctx.out_dir), "songs": len(names), "hooks": hooks, "d_model": adapter.d_model,
            "dtype": cfg.dtype, "shards": writer.n_shards, "tokens": writer.n_tokens,
            "tokens_this_run": stats["tokens"], "windows_this_run": stats["windows"],
            "dropped_notes": stats["dropped_notes"], "seconds": round(seconds, 2),
            "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 1),
        }
        if ctx.dist.enabled:
            summary["ranks"] = ctx.dist.world
        writer.finish(summary)
        return summary

    def _extract(self, ctx: StageContext, adapter: ModelAdapter, hooks: list[str],
                 upcoming: Callable[[ShardPlan | None], ShardPlan | None],
                 write: Callable[..., Any], stats: dict[str, Any], songs: int) -> None:
        """Forward and write the shards ``upcoming`` plans one after the other.

        Shard k's forward passes run on the workers while the main thread plans shard k+1
        (``upcoming(k)``), and shard k-1 is written by a background thread; writes stay in
        order (each waits for the previous one), so at most two shards' activations are
        in memory. ``songs``: how many songs the shards hold (for the progress bar).
        """
        t0 = time.perf_counter()
        bar = ctx.progress(total=songs, unit="song", desc="extract")
        shape = (len(hooks), adapter.d_model)
        with self._workers(ctx.device) as forward, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
            pending: Future[Any] | None = None
            buffers: list[np.ndarray | None] = [None, None]  # one computed, one being written
            plan = upcoming(None)
            while plan is not None:
                buffers[0] = _room(buffers[0], plan.n_tokens, shape)
                acts = buffers[0][: plan.n_tokens]
                running = self._submit_shard(forward, adapter, plan, hooks, acts)
                following = upcoming(plan)
                for done in running:
                    seconds, windows = done.result()
                    stats["forward_seconds"] += seconds
                    stats["windows"] += windows
                buffers.reverse()
                if pending is not None:
                    pending.result()
                place = {} if plan.index is None else {"index": plan.index, "token_start": plan.token_start}
                pending = pool.submit(write, acts, plan.coords, plan.songs[0], plan.songs[-1] + 1, **place)
                stats["tokens"] += plan.n_tokens
                bar.update(len(plan.songs))
                bar.set_postfix(tok_s=f"{stats['tokens'] / max(1e-9, time.perf_counter() - t0):.0f}")
                plan = following
            if pending is not None:
                pending.result()
        bar.close()

    def _extract_ranked(self, ctx: StageContext, adapter: ModelAdapter, store: Any,
                        create: dict[str, Any], shard_tokens: int, stats: dict[str, Any],
                        planner: SongPlanner) -> Any:
        """This rank's share of the store under ``torchrun``; rank 0's writer of the joined store.

        Every rank counts the stored tokens of its block of songs (on its planning workers,
        if any); from all the counts each rank cuts the same shards a single process would
        write (:func:`cut_shards`) and writes shards ``rank, rank + world, ...`` that are not complete yet. Rank 0 then
        joins the ranks' shards into the store (complete only when every rank is).
        """
        from .. import ranks

        d, names = ctx.dist, self._names
        if d.main:
            writer = store.create(ctx.work_dir, **create)
        ranks.barrier()  # the store exists (rank 0 joined what an interrupted run left)
        try:
            part = store.attach(ctx.work_dir, d.rank)
        except NotImplementedError:
            raise UserError(f"extract.store: the {self.config.store.name!r} store cannot be written "
                            "by several ranks; run extract without torchrun") from None
        done = ranks.gather(writer.n_shards if d.main else None)[0]  # complete shards so far
        lo, hi = (len(names) * d.rank) // d.world, (len(names) * (d.rank + 1)) // d.world
        counts = [c for block in ranks.gather(planner.counts(range(lo, hi))) for c in block]
        shards = cut_shards(counts, shard_tokens)[done:]
        mine = [s for k, s in enumerate(shards) if k % d.world == d.rank]
        if d.main and done:
            print(f"extract: resuming after {done} complete shard(s)", file=sys.stderr)
        queue = iter(mine)
        songs = planner.plans([song for s in mine for song in range(s.song_start, s.song_stop)])

        def upcoming(_: ShardPlan | None) -> ShardPlan | None:
            spec = next(queue, None)
            if spec is None:
                return None
            plan = take_shard(songs, stats, stop=spec.song_stop)
            assert plan is not None and plan.songs[0] == spec.song_start
            plan.index, plan.token_start = spec.index, spec.token_start
            return plan

        self._extract(ctx, adapter, create["hooks"], upcoming, part.write_shard, stats,
                      sum(s.song_stop - s.song_start for s in mine))
        everyone = ranks.gather(stats)
        ranks.barrier()  # every rank's shards are written
        if not d.main:
            return part
        for key in stats:
            stats[key] = sum(s[key] for s in everyone)
        writer.join_parts()
        if writer.next_song != len(names):
            raise UserError(f"extract: the ranks' shards do not cover every song (up to song "
                            f"{writer.next_song} of {len(names)}); rerun to write the rest")
        return writer

    @contextmanager
    def _workers(self, device: str) -> Iterator[ThreadPoolExecutor]:
        """The forward workers of this run (see ``ExtractConfig``); with several, torch's
        threads are shared out between them for the run and restored afterwards."""
        import torch

        self._local = threading.local()
        threads = torch.get_num_threads()
        n = self.config.forward_workers or default_forward_workers(device)
        if n > 1:
            torch.set_num_threads(max(1, threads // n))
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="forward")
        try:
            yield pool
        finally:  # on an error, batches not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)

    def _submit_shard(self, forward: ThreadPoolExecutor, adapter: ModelAdapter, plan: ShardPlan,
                      hooks: list[str], out: np.ndarray) -> list[Future[tuple[float, int]]]:
        """Queue the shard's forward batches, longest windows first, on the workers.

        ``out``: memory for the result, (n_tokens, n_hooks, d_model) float32 (the stage
        reuses it across shards rather than page in fresh memory for each). Each batch
        writes its tokens' rows of ``out`` (disjoint rows, in song order), so the result
        does not depend on which worker ran which batch. Each future gives (seconds of
        the forward pass and gather, windows).
        """
        import torch

        target = torch.from_numpy(out)
        batches = shard_batches(plan, self.config.batch_size, self.config.length_slack)
        return [forward.submit(self._run_batch, adapter, plan, idx, hooks, target) for idx in batches]

    def _run_batch(self, adapter: ModelAdapter, plan: ShardPlan, idx: list[int], hooks: list[str],
                   target: Any) -> tuple[float, int]:
        """One forward batch; its kept tokens' activations go to their rows of ``target``."""
        import torch

        batch = adapter.pad([plan.windows[i][2].inputs for i in idx])
        t0 = time.perf_counter()
        acts = adapter.run_with_hooks(batch, hooks)
        # flat (row * T + position) of every kept token, and its destination row
        t = batch.codes.shape[1]
        src = torch.from_numpy(np.concatenate([plan.keep[i] + j * t for j, i in enumerate(idx)]))
        dest = torch.from_numpy(np.concatenate([plan.offsets[i] for i in idx]))
        width = target.shape[2]
        for h, name in enumerate(hooks):
            flat = acts[name].reshape(-1, width)
            if flat.is_cpu and flat.dtype == torch.float32:  # gather into reused memory
                picked = torch.index_select(flat, 0, src, out=self._scratch(len(src), width))
            else:
                picked = flat.index_select(0, src.to(flat.device)).float().cpu()
            if not bool(torch.isfinite(picked).all()):
                self._non_finite(plan, name, picked, dest)
            target[:, h].index_copy_(0, dest, picked)
        return time.perf_counter() - t0, len(idx)

    def _non_finite(self, plan: ShardPlan, hook: str, picked: Any, dest: Any) -> None:
        """Refuse activations that are NaN or infinite, naming the hook point and the song."""
        import torch

        rows = (~torch.isfinite(picked)).any(dim=1).nonzero().flatten()
        row = int(dest[int(rows[0])])
        song = self._names[int(plan.coords["song"][row])]
        raise UserError(f"extract: {len(rows)} token(s) of song {song!r} have NaN or infinite "
                        f"activations at hook point {hook} (overflow in dtype "
                        f"{self._dtype}? a broken checkpoint?); nothing was stored for them")

    def _scratch(self, rows: int, width: int) -> Any:
        """A float32 CPU tensor (rows, width) of this thread, reusing its earlier memory."""
        import torch

        local = self._local
        buf = getattr(local, "buf", None)
        if buf is None or buf.numel() < rows * width:
            buf = local.buf = torch.empty(rows * width)
        return buf[: rows * width].view(rows, width)


def default_forward_workers(device: str) -> int:
    """Forward workers when the config leaves it open: 2 on a CPU with 2+ torch threads, else 1."""
    import torch

    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def _room(buffer: np.ndarray | None, n_tokens: int, shape: tuple[int, int]) -> np.ndarray:
    """``buffer`` if it holds ``n_tokens`` rows of ``shape``, else a new (larger) array."""
    if buffer is not None and buffer.shape[0] >= n_tokens and buffer.shape[1:] == shape:
        return buffer
    return np.empty((n_tokens, *shape), np.float32)


def _version() -> str:
    from ..version import __version__

    return __version__


def _jsonable(value: Any) -> Any:
    from ..jsonio import to_jsonable

    return to_jsonable(value)
