"""One hook point's training job for the ``train`` stage: loaders, normalisation, the
trainer of its dictionary (or of a sweep's members), the ``config.json`` fields, and the
model and data of the downstream evaluation.

:class:`HookJob` turns the stage's options into an
:class:`~music_interpret.loader.ActivationLoader`, :class:`~.trainer.TrainSettings` and a
:class:`~.trainer.Trainer`; :class:`DownstreamSource` loads the pipeline's model (or the one
the store was extracted from) through its adapter, once, for every hook's evaluation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_ADAPTER
from ..errors import UserError
from ..normalize import NONE, STANDARDIZE, UNIT_MEAN_NORM
from ..ranks import info as dist_info

if TYPE_CHECKING:
    import torch

    from ..context import StageContext
    from ..interfaces import ModelAdapter, SongDataset, StoreReader
    from ..loader import ActivationLoader
    from ..stages.train import TrainConfig
    from .dictionary import Learner
    from .downstream import DownstreamEvaluator
    from .trainer import TrainResult, TrainSettings

Members = Sequence[tuple[str, "Learner"]]

MIN_STEPS, MIN_LR_STEPS = 1000, 0.25  # below either, a dictionary rarely converges
TARGET_MIN_STEPS = 200  # target_l0 settles within 224 steps on bench/sae_equal_l0.py
POOR_FVU = 0.5


def warn_if_short(hook: str, steps: int, lr: float) -> None:
    """A warning on stderr when the run looks too short to converge (rank 0 only)."""
    if steps >= MIN_STEPS and lr * steps >= MIN_LR_STEPS or not dist_info().main:
        return
    print(f"train: warning: {hook}: {steps:,} steps at lr {lr:g} (lr x steps = {lr * steps:.3g}) "
          f"is likely too short to converge (fewer than {MIN_STEPS:,} steps, or lr x steps below "
          f"{MIN_LR_STEPS}); set train.steps / --steps (the demo trains 2,500 steps at lr 1e-3, "
          "batch 1,024)", file=sys.stderr, flush=True)


def warn_if_poor(hook: str, metrics: dict[str, Any]) -> None:
    """A warning on stderr when the held-out FVU is poor."""
    fvu = (metrics.get("holdout") or {}).get("fvu")
    if fvu is not None and fvu > POOR_FVU:
        print(f"train: warning: {hook}: held-out FVU {fvu:.3g}: the dictionary reconstructs "
              "poorly (train longer, or lower l1_coeff / raise k)", file=sys.stderr, flush=True)


def summary_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of a trained dictionary."""
    held = metrics.get("holdout") or {}
    return {"steps": metrics.get("steps"), **{k: held[k] for k in ("fvu", "l0", "dead_fraction")
                                              if k in held}}


class HookJob:
    """Loaders, normalisation and trainer for one hook point of a store."""

    def __init__(self, cfg: TrainConfig, info: StoreReader, hook: str, learner: Learner,
                 device: str, seed: int, stats_dir: Path, mode: str) -> None:
        from .holdout import holdout_songs

        self.cfg, self.info, self.hook, self.learner = cfg, info, hook, learner
        self.device, self.seed, self.stats_dir, self.mode = device, seed, stats_dir, mode
        self.downstream: Callable[[Any, float], dict[str, Any]] | None = None
        held = set(holdout_songs(info.songs, cfg.holdout_fraction, seed))
        wanted = cfg.filters.get("song")
        wanted = None if wanted is None else set([wanted] if isinstance(wanted, int) else wanted)
        keep = [i for i in range(len(info.songs)) if wanted is None or i in wanted]
        self.train_songs = [i for i in keep if i not in held]
        self.held_songs = [i for i in keep if i in held]
        if not self.train_songs:
            raise UserError(f"train: no training songs left in {info.path} after the hold-out split "
                            f"and filters")

    def loader(self, songs: list[int], batch_size: int, **kw: Any) -> ActivationLoader:
        from ..loader import ActivationLoader

        stats = self.stats_dir / "stats.nc" if self.mode != NONE else None
        return ActivationLoader(self.info, self.hook, batch_size, normalization=self.mode,
                                stats=stats, filters={**self.cfg.filters, "song": songs},
                                block_tokens=self.cfg.block_tokens, buffer_blocks=self.cfg.buffer_blocks,
                                shuffle_run=self.cfg.shuffle_run, **kw)

    def _stats_scale(self) -> float | None:
        """Input scale implied by the statistics (for ``input_scaling: stats``)."""
        if self.mode in (UNIT_MEAN_NORM, STANDARDIZE):
            return 1.0  # both give E||x||^2 ~ d_model already
        try:
            from ..stats import load_stats

            stats = load_stats(self.stats_dir / "stats.nc")
            mean_norm = float(stats["mean_norm"].sel(hook=self.hook))
        except (UserError, KeyError):
            return None
        return math.sqrt(self.info.d_model) / mean_norm if mean_norm > 0 else None

    def train(self, members: Learner | Members, ckpt: Path,
              tb_dir: Path | Callable[[str], Path | None], progress: Callable[..., Any],
              ) -> dict[str, TrainResult]:
        """Train the hook's learner (or every member of a sweep, on the same batches);
        ``{label: result}`` (label ``""`` for a single learner)."""
        from .trainer import Trainer

        loader, settings = self._setup()
        trainer = Trainer(members, loader, settings, checkpoint=ckpt, tb_dir=tb_dir,
                          progress=progress, init_sample=self._sample,
                          eval_batches=self._eval_batches, norm_scale=self.norm_scale,
                          stats_scale=self._stats_scale(), downstream=self.downstream,
                          downstream_every=self.cfg.downstream_every)
        return trainer.run_all()

    def _setup(self) -> tuple[ActivationLoader, TrainSettings]:
        """The training loader and settings (and the normaliser's shift and scale)."""
        import torch

        from .trainer import TrainSettings

        cfg, lc = self.cfg, self.learner.config
        probe = self.loader(self.train_songs, lc.batch_size, prefetch=0)
        self.n_train = probe.n_tokens
        world = dist_info().world  # under torchrun the global batch splits over the ranks
        self.batch_size = min(lc.batch_size, probe.n_tokens // world * world)
        norm = probe.normalizer
        self.shift = torch.as_tensor(norm.shift, dtype=torch.float32)
        self.scale = torch.as_tensor(norm.scale, dtype=torch.float32)
        self.norm_scale = torch.as_tensor(norm.scale)
        self.normalizer = norm.describe()
        self._eval_loader = self._open_eval_loader()
        if cfg.steps is not None:
            steps = cfg.steps
        elif cfg.max_tokens is not None:
            steps = math.ceil(cfg.max_tokens / self.batch_size)
        else:
            steps = max(1, self.n_train // self.batch_size)  # one epoch
        loader = self.loader(self.train_songs, self.batch_size, seed=self.seed, drop_last=True,
                             epochs=None, device=self.device)
        warn_if_short(self.hook, steps, float(lc.lr))
        if getattr(lc, "target_l0", None) is not None and steps < TARGET_MIN_STEPS and dist_info().main:
            print(f"train: warning: {self.hook}: target_l0 over {steps:,} steps: the L1 controller "
                  f"needs about {TARGET_MIN_STEPS:,} steps to settle; shorter runs miss the target "
                  "(see bench/results/sae_equal_l0.json); use a fixed l1_coeff or topk",
                  file=sys.stderr, flush=True)
        settings = TrainSettings(steps=steps, log_every=cfg.log_every,
                                 checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                                 dead_window_tokens=cfg.dead_window_tokens,
                                 dense_threshold=cfg.dense_threshold, device=self.device,
                                 seed=self.seed, name=self.hook)
        return loader, settings

    def _sample(self) -> torch.Tensor:
        n = min(self.learner.config.init_sample_tokens, self.n_train)
        loader = self.loader(self.train_songs, n, seed=self.seed + 1, prefetch=0)
        return next(iter(loader))

    def _open_eval_loader(self) -> ActivationLoader | None:
        """The held-out loader, opened before training starts: opening a store makes
        netCDF calls outside the loader's lock, which must not overlap the training
        loader's reading thread (intermediate crashes otherwise)."""
        if not self.held_songs:
            return None
        try:
            return self.loader(self.held_songs, 4096, shuffle=False, prefetch=1)
        except UserError:  # the held-out songs have no selected tokens
            return None

    def _eval_batches(self) -> Iterator[torch.Tensor]:
        loader = self._eval_loader
        if loader is None:
            return
        loader.load_state_dict({"epoch": 0, "position": 0})  # every evaluation: the same tokens
        seen = 0
        try:
            for x in loader:
                yield x[: self.cfg.eval_tokens - seen]
                seen += len(x)
                if seen >= self.cfg.eval_tokens:
                    break
        finally:
            loader.close()

    def raw(self, result: TrainResult) -> Any:
        """The trained dictionary on raw activations (normalisation folded in)."""
        return result.model.folded(self.shift, self.scale * result.input_scale)

    def describe(self, result: TrainResult, learner: Learner, fingerprint: str) -> dict[str, Any]:
        """The ``config.json`` fields beyond the architecture."""
        from ..jsonio import to_jsonable
        from ..version import __version__

        attrs = self.info.attrs
        model_cfg = attrs.get("model_config") or {}
        if isinstance(model_cfg, str):
            import json

            model_cfg = json.loads(model_cfg)
        return {
            "hook_point": self.hook,
            "learner": {"name": learner.name, "config": to_jsonable(learner.config)},
            "normalization": {"loader": self.normalizer, "input_scale": result.input_scale,
                              "folded": True, "stats_dir": str(self.stats_dir) if self.mode != NONE else None},
            "training": {"steps": result.steps, "tokens": result.tokens, "batch_size": self.batch_size,
                         "seed": self.seed, "device": self.device, "filters": to_jsonable(self.cfg.filters),
                         "holdout_fraction": self.cfg.holdout_fraction,
                         "holdout_songs": [self.info.songs[i] for i in self.held_songs],
                         "train_songs": len(self.train_songs), "train_tokens": self.n_train,
                         "stage_config": to_jsonable(self.cfg), "fingerprint": fingerprint},
            "data": {"store_path": str(self.info.path), "store_id": self.info.store_id,
                     "store_manifest_sha256": self.info.digest, "n_tokens": self.info.n_tokens,
                     "dataset": attrs.get("dataset"), "split": attrs.get("split"),
                     "events": attrs.get("events")},
            "model": {"name": attrs.get("model_adapter") or DEFAULT_ADAPTER,
                      "sha256": attrs.get("model_sha256"), "source": attrs.get("source"),
                      "path": attrs.get("model_path"),
                      "context_size": model_cfg.get("max_seq_len") if isinstance(model_cfg, dict) else None},
            "input": {"space": "raw", "mean_norm": self._raw_mean_norm()},
            "music_interpret_version": __version__,
        }

    def _raw_mean_norm(self, tokens: int = 65_536) -> float:
        """Mean L2 norm of raw training activations (what ``encode`` checks batches against)."""
        import torch

        from ..loader import ActivationLoader

        loader = ActivationLoader(self.info, self.hook, min(tokens, self.n_train),
                                  filters={**self.cfg.filters, "song": self.train_songs},
                                  seed=self.seed, prefetch=0)
        try:
            return float(torch.linalg.vector_norm(next(iter(loader)), dim=1).mean())
        finally:
            loader.close()


class DownstreamSource:
    """The model (loaded once, through its adapter) and the song dataset of the downstream
    evaluations."""

    def __init__(self, adapter: ModelAdapter, dataset: SongDataset, notes_only: bool) -> None:
        self.adapter, self.dataset, self.notes_only = adapter, dataset, notes_only

    @classmethod
    def setup(cls, ctx: StageContext, cfg: TrainConfig, info: StoreReader,
              device: str) -> DownstreamSource | None:
        """Load the model and open the dataset; None (with a note) when ``auto`` cannot."""
        if cfg.downstream == "off" or cfg.holdout_fraction <= 0:
            return None
        header = ctx.pipeline.header
        attrs = info.attrs

        def skip(reason: str) -> None:
            if cfg.downstream == "on":
                raise UserError(f"train.downstream: {reason}")
            print(f"train: no downstream evaluation ({reason})", file=sys.stderr, flush=True)

        if header.model is not None and header.data is not None:
            adapter = header.model.adapter.build(ctx.registry)
            model_path, data_path, data_split = header.model.path, header.data.path, header.data.split
        else:  # no pipeline model/data (a seed command): those the store was extracted from
            from ..provenance import recorded_inputs

            recorded = recorded_inputs(attrs)
            if isinstance(recorded, str):
                skip(f"the pipeline names no model and data, and {recorded}")
                return None
            found = ctx.registry.find("model_adapter", recorded.adapter)
            if found is None:
                skip(f"model adapter {recorded.adapter!r} recorded by the store is not installed")
                return None
            adapter = found(found.Config())
            model_path, data_path, data_split = recorded.model_path, recorded.data_path, "all"
            print(f"train: downstream evaluation on the model and data the store was extracted "
                  f"from ({model_path}, {data_path})", file=sys.stderr, flush=True)
        adapter.load(model_path, device=device)
        stored = attrs.get("model_sha256")
        if stored and stored != adapter.checkpoint_sha256:
            skip(f"the store {info.path} was extracted from another checkpoint than {model_path}")
            return None
        split = attrs.get("split") if attrs.get("split") in ("all", "train", "valid", "test") else None
        dataset = adapter.open_dataset(data_path, split or data_split)
        return cls(adapter, dataset, attrs.get("events") == "notes")

    def evaluator(self, hook: str, songs: list[str], cfg: TrainConfig) -> DownstreamEvaluator | None:
        from .downstream import DownstreamEvaluator, DownstreamSettings

        settings = DownstreamSettings(cfg.downstream_windows, cfg.downstream_tokens,
                                      cfg.downstream_batch_size)
        names = [n for n in songs if n in self.dataset]
        return DownstreamEvaluator.for_songs(self.adapter, hook, self.dataset.read, names, settings,
                                             notes_only=self.notes_only)

    def for_job(self, job: HookJob) -> Callable[[Any, float], dict[str, Any]] | None:
        """``(model, input_scale) -> dict`` evaluating a training-space model of ``job``
        downstream, or None when its held-out songs give no window."""
        if not job.held_songs:
            return None
        names = [job.info.songs[i] for i in job.held_songs]
        evaluator = self.evaluator(job.hook, names, job.cfg)
        if evaluator is None:
            return None

        def run(model: Any, input_scale: float) -> dict[str, Any]:
            return evaluator.evaluate(model.folded(job.shift, job.scale * input_scale))

        return run
