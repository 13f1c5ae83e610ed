"""The ``train`` stage: one sparse dictionary per hook point of an activation store.

Reads the store written by ``extract`` (or ``train.store``), normalised on the fly as
the ``preprocess`` stage describes (``normalization: auto``: the mode in
``<store>/stats/normalization.json`` when present, else none). Songs are split by a
seeded hash of their names (:mod:`music_interpret.learners.holdout`): the held-out
songs (``holdout_fraction``, default 10%) are never trained on and give the final
evaluation. Output (published as ``reports/<run>/train/``)::

    dictionaries/<hook>/weights.safetensors, config.json, metrics.json
    tensorboard/<hook>/events.out.tfevents.*

With ``sweep: {l1_coeff: [...]}`` (or ``{k: [...]}``, any one learner option but
``batch_size``) one dictionary per value is trained on the same batches in one pass over
the data; with two options (``{d_sae: [256, 1024, 4096], seed: [0, 1]}``) one per
combination (the product). A swept ``seed`` seeds the member's initialisation only: the
hold-out split and the batches stay the run's (``training.seed`` in ``config.json``)::

    dictionaries/<hook>/<p1>=<v1>[,<p2>=<v2>]/weights.safetensors, config.json, metrics.json
    dictionaries/<hook>/sweep.json          (the options, the members, the L0-FVU curve)
    tensorboard/<hook>/<p1>=<v1>[,<p2>=<v2>]/

Downstream loss (``downstream: auto``, the default, when the pipeline names a
``model`` and ``data`` whose checkpoint is the one the store was extracted from, and
songs are held out): the reconstruction is spliced into the model at the hook point
on up to ``downstream_windows`` windows / ``downstream_tokens`` tokens of the held-out
songs (:mod:`music_interpret.learners.downstream`); per-field cross-entropies (clean,
spliced, mean-ablated) and the fraction of loss recovered go to ``metrics.json``
(``downstream``) and TensorBoard (``downstream/*``), at the end and every
``downstream_every`` steps. ``on`` makes a missing model/data an error, ``off`` skips it.

Checkpoints live in ``checkpoints/<hook>/`` while a hook trains; after a crash the
engine hands the partial folder back and training continues from them. A hook whose
``config.json`` (``sweep.json`` for a sweep) exists is complete and is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import PluginRef
from ..errors import UserError
from ..interfaces import Stage

NORMALIZATION_FILE = "normalization.json"


@dataclass
class TrainConfig:
    """Options of ``train`` (the recipe itself is the learner's config)."""

    learner: PluginRef = field(default="relu_l1", metadata={"plugin": "dictionary_learner"})  # type: ignore[assignment]
    store: Path | None = field(default=None, metadata={"input": True})
    hooks: list[str] = field(default_factory=list)
    normalization: Literal["auto", "none", "standardize", "unit_mean_norm"] = "auto"
    stats: Path | None = field(default=None, metadata={"input": True})
    steps: int | None = None
    max_tokens: int | None = None
    log_every: int = 100
    checkpoint_every: int = 1000
    eval_every: int | None = None
    eval_tokens: int = 1_000_000
    holdout_fraction: float = 0.1
    filters: dict[str, Any] = field(default_factory=dict)
    dead_window_tokens: int = 1_000_000
    dense_threshold: float = 0.1
    block_tokens: int = 65_536
    buffer_blocks: int = 4
    shuffle_run: int = 1
    device: str | None = None
    keep_checkpoints: bool = False
    sweep: dict[str, list[float]] = field(default_factory=dict)
    downstream: Literal["auto", "on", "off"] = "auto"
    downstream_every: int | None = None
    downstream_windows: int = 32
    downstream_tokens: int = 32_768
    downstream_batch_size: int = 8

    def __post_init__(self) -> None:
        if len(self.sweep) > 2:
            raise ValueError(f"sweep: give one or two options to sweep (a grid), got "
                             f"{', '.join(self.sweep)}")
        for name in ("downstream_windows", "downstream_tokens", "downstream_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "max_tokens", "eval_every", "downstream_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("log_every", "checkpoint_every", "eval_tokens", "dead_window_tokens",
                     "block_tokens", "buffer_blocks", "shuffle_run"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")


class TrainStage(Stage):
    """Train one sparse dictionary per hook point on the stored activations."""

    name = "train"
    description = "Train one sparse dictionary (relu_l1, topk, ...) per hook point on the activation store."
    Config = TrainConfig

    # -- inputs ---------------------------------------------------------------------------

    def _store(self, ctx: Any) -> Path:
        if self.config.store is not None:
            return Path(self.config.store)
        if "extract" in ctx.upstream:
            return ctx.output_of("extract")
        raise UserError("train.store: no activation store (set train.store, or run the extract "
                        "stage in this pipeline)")

    def _stats_dir(self, store: Path) -> Path:
        stats = self.config.stats
        if stats is None:
            return store / "stats"
        return stats if stats.is_dir() else stats.parent

    def inputs(self, ctx: Any) -> list[Path]:
        store = self.config.store or ctx.upstream.get("extract")
        if store is None:
            return []
        store = Path(store)
        files = [store / "store.json"]
        if self.config.normalization != "none" or self.config.stats is not None:
            stats_dir = self._stats_dir(store)
            files += [stats_dir / "stats.nc", stats_dir / NORMALIZATION_FILE]
        return files

    def _mode(self, stats_dir: Path) -> str:
        mode = self.config.normalization
        if mode != "auto":
            return mode
        try:
            return str(json.loads((stats_dir / NORMALIZATION_FILE).read_text())["mode"])
        except FileNotFoundError:
            return "none"
        except (OSError, ValueError, KeyError):
            raise UserError(f"{stats_dir / NORMALIZATION_FILE}: unreadable normalisation file") from None

    # -- checks before anything runs ----------------------------------------------------

    def check(self, pipeline: Any, registry: Any) -> list[str]:
        """``train.device`` and whether the dictionaries fit in the device's memory."""
        from ..config import device_problem
        from ..resources import memory_problem, resolve_device

        cfg: TrainConfig = self.config
        if cfg.device is not None and (problem := device_problem(cfg.device)):
            return [f"train.device: {problem}"]
        d_in = self._planned_d_in(pipeline, registry)
        if d_in is None or cfg.learner is None:
            return []
        lc = cfg.learner.config
        sizes = member_sizes(lc, cfg.sweep, d_in)
        # weights, gradients and Adam's two moments, plus about four (batch, d_sae) tensors a step
        need = sum(4 * (4 * (2 * d_in * d + d + d_in) + 4 * lc.batch_size * d) for d in sizes)
        device = resolve_device(cfg.device or pipeline.header.device)
        size = f"{max(sizes):,}" if len(set(sizes)) == 1 else f"up to {max(sizes):,}"
        what = (f"train.learner.d_sae: {len(sizes)} dictionary(ies) of {size} latents on "
                f"{d_in}-dimensional activations with batches of {lc.batch_size}")
        problem = memory_problem(need, what, device)
        return [problem] if problem else []

    def _planned_d_in(self, pipeline: Any, registry: Any) -> int | None:
        """d_model of the store to train on: from its manifest, else from the model folder."""
        store = self.config.store
        if store is None and "extract" in pipeline.header.stages:
            extract = registry.find("stage", "extract")
            if extract is not None:
                store = extract.output_dir(pipeline, pipeline.stage_configs.get("extract"))
        if store is not None:
            try:
                return int(json.loads((Path(store) / "store.json").read_text())["d_model"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        model = pipeline.header.model
        if model is None:
            return None
        try:
            return int(model.adapter.build(registry).describe(model.path).d_model)
        except (NotImplementedError, UserError):
            return None

    # -- run ------------------------------------------------------------------------------

    def run(self, ctx: Any) -> dict[str, Any]:
        import torch

        from ..stores.netcdf import check_store

        cfg: TrainConfig = self.config
        store = self._store(ctx)
        info = check_store(store)
        hooks = list(cfg.hooks) or info.hooks
        unknown = [h for h in hooks if h not in info.hooks]
        if unknown:
            raise UserError(f"train.hooks: {', '.join(unknown)} not in the store {info.path} "
                            f"(extracted: {', '.join(info.hooks)})")
        device = cfg.device or ctx.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"train.device: {device!r} requested but CUDA is not available")
        learner = cfg.learner.build(ctx.registry)
        seed = learner.config.seed if learner.config.seed is not None else ctx.seed
        if cfg.sweep:
            from ..learners.sweep import sweep_learners

            sweep_learners(learner, cfg.sweep)  # check the options before any training
        self._downstream = _DownstreamSource.setup(ctx, cfg, info, device)
        summary: dict[str, Any] = {"store": str(info.path), "learner": learner.name, "hooks": {}}
        for hook in hooks:
            summary["hooks"][hook] = self._train_hook(ctx, info, hook, learner, device, seed)
        return summary

    def _train_hook(self, ctx: Any, info: Any, hook: str, learner: Any, device: str,
                    seed: int) -> dict[str, Any]:
        from ..learners.io import CONFIG, METRICS, save_dictionary

        out_dir = ctx.work_dir / "dictionaries" / hook
        if self.config.sweep:
            return self._train_sweep(ctx, info, hook, learner, device, seed)
        if (out_dir / CONFIG).exists():  # finished before an interruption
            return _summary(json.loads((out_dir / METRICS).read_text()))
        job = _HookJob(self.config, info, hook, learner, device, seed, self._stats_dir(info.path))
        job.mode = self._mode(job.stats_dir)
        job.downstream = self._downstream_for(job)
        ckpt = ctx.work_dir / "checkpoints" / hook / "checkpoint.pt"
        result = job.train(ckpt, ctx.work_dir / "tensorboard" / hook,
                           lambda **kw: ctx.progress(desc=f"train {hook}", **kw))
        raw = result.model.folded(job.shift, job.scale * result.input_scale)
        config = job.describe(result, ctx)
        metrics = {"holdout": result.metrics, "steps": result.steps, "tokens": result.tokens}
        if result.downstream:
            metrics["downstream"] = result.downstream
        save_dictionary(out_dir, raw, config, metrics)
        _warn_if_poor(hook, metrics)
        if not self.config.keep_checkpoints:
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        return _summary(metrics)

    def _downstream_for(self, job: _HookJob) -> Any:
        """``(model, input_scale) -> dict`` evaluating a training-space model downstream, or None."""
        source = getattr(self, "_downstream", None)
        if source is None or not job.held_songs:
            return None
        names = [job.info.songs[i] for i in job.held_songs]
        evaluator = source.evaluator(job.hook, names, self.config)
        if evaluator is None:
            return None

        def run(model: Any, input_scale: float) -> dict[str, Any]:
            return evaluator.evaluate(model.folded(job.shift, job.scale * input_scale))

        return run

    def _train_sweep(self, ctx: Any, info: Any, hook: str, learner: Any, device: str,
                     seed: int) -> dict[str, Any]:
        """Train one dictionary per swept value on shared batches (see the module doc)."""
        from ..jsonio import write_json_atomic
        from ..learners.io import save_dictionary
        from ..learners.sweep import curve, grid_points, sweep_learners

        out_dir = ctx.work_dir / "dictionaries" / hook
        if (out_dir / "sweep.json").exists():
            done = json.loads((out_dir / "sweep.json").read_text())
            return {"sweep": done["param"], "points": done["curve"]}
        members = sweep_learners(learner, self.config.sweep)
        points = dict(zip([n for n, _ in members], grid_points(learner, self.config.sweep),
                          strict=True))
        params = list(self.config.sweep)
        job = _HookJob(self.config, info, hook, learner, device, seed, self._stats_dir(info.path))
        job.mode = self._mode(job.stats_dir)
        job.downstream = self._downstream_for(job)
        ckpt = ctx.work_dir / "checkpoints" / hook / "sweep.pt"
        results = job.train_sweep(members, ckpt, ctx.work_dir / "tensorboard" / hook,
                                  lambda **kw: ctx.progress(desc=f"train {hook} sweep", **kw))
        done: dict[str, Any] = {}
        for name, member in members:
            result = results[name]
            job.learner = member
            raw = result.model.folded(job.shift, job.scale * result.input_scale)
            metrics = {"holdout": result.metrics, "steps": result.steps, "tokens": result.tokens}
            if result.downstream:
                metrics["downstream"] = result.downstream
            config = job.describe(result, ctx)
            config["sweep"] = {"param": ",".join(params), "params": params, "label": name,
                               "values": points[name]}
            save_dictionary(out_dir / name, raw, config, metrics)
            done[name] = metrics
        job.learner = learner
        summary = {"param": ",".join(params), "params": params,
                   "grid": {p: list(dict.fromkeys(pt[p] for pt in points.values()))
                            for p in params},
                   "members": [{"label": n, "values": points[n]} for n, _ in members],
                   "curve": curve(done)}
        if len(params) == 1:
            summary["values"] = summary["grid"][params[0]]
        write_json_atomic(out_dir / "sweep.json", summary)
        if not self.config.keep_checkpoints:
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        return {"sweep": summary["param"], "points": summary["curve"]}


def member_sizes(lc: Any, sweep: dict[str, list[Any]], d_in: int) -> list[int]:
    """Latents of every dictionary a hook trains (one per sweep point)."""
    import itertools

    axes = [[(p, v) for v in values] for p, values in sweep.items()]
    out = []
    for point in (dict(c) for c in itertools.product(*axes)):
        d_sae = point.get("d_sae", lc.d_sae)
        out.append(int(d_sae) if d_sae else int(point.get("expansion", lc.expansion)) * d_in)
    return out


MIN_STEPS, MIN_LR_STEPS = 1000, 0.25  # below either, a dictionary rarely converges
POOR_FVU = 0.5


def _warn_if_short(hook: str, steps: int, lr: float) -> None:
    """A warning on stderr when the run looks too short to converge."""
    import sys

    if steps >= MIN_STEPS and lr * steps >= MIN_LR_STEPS:
        return
    print(f"train: warning: {hook}: {steps:,} steps at lr {lr:g} (lr x steps = {lr * steps:.3g}) "
          f"is likely too short to converge (fewer than {MIN_STEPS:,} steps, or lr x steps below "
          f"{MIN_LR_STEPS}); set train.steps / --steps (the demo trains 2,500 steps at lr 1e-3, "
          "batch 1,024)", file=sys.stderr, flush=True)


def _warn_if_poor(hook: str, metrics: dict[str, Any]) -> None:
    import sys

    fvu = (metrics.get("holdout") or {}).get("fvu")
    if fvu is not None and fvu > POOR_FVU:
        print(f"train: warning: {hook}: held-out FVU {fvu:.3g}: the dictionary reconstructs "
              "poorly (train longer, or lower l1_coeff / raise k)", file=sys.stderr, flush=True)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    held = metrics.get("holdout") or {}
    return {"steps": metrics.get("steps"), **{k: held[k] for k in ("fvu", "l0", "dead_fraction")
                                              if k in held}}


class _HookJob:
    """Loaders, normalisation and trainer for one hook point."""

    def __init__(self, cfg: TrainConfig, info: Any, hook: str, learner: Any, device: str,
                 seed: int, stats_dir: Path) -> None:
        self.cfg, self.info, self.hook, self.learner = cfg, info, hook, learner
        self.device, self.seed, self.stats_dir = device, seed, stats_dir
        self.mode = "none"
        self.downstream: Any = None
        from ..learners.holdout import holdout_songs

        held = set(holdout_songs(info.songs, cfg.holdout_fraction, seed))
        wanted = cfg.filters.get("song")
        wanted = None if wanted is None else set([wanted] if isinstance(wanted, int) else wanted)
        keep = [i for i in range(len(info.songs)) if wanted is None or i in wanted]
        self.train_songs = [i for i in keep if i not in held]
        self.held_songs = [i for i in keep if i in held]
        if not self.train_songs:
            raise UserError(f"train: no training songs left in {info.path} after the hold-out split "
                            f"and filters")

    def loader(self, songs: list[int], batch_size: int, **kw: Any) -> Any:
        from ..loader import ActivationLoader

        stats = self.stats_dir / "stats.nc" if self.mode != "none" else None
        return ActivationLoader(self.info.path, self.hook, batch_size, normalization=self.mode,
                                stats=stats, filters={**self.cfg.filters, "song": songs},
                                block_tokens=self.cfg.block_tokens, buffer_blocks=self.cfg.buffer_blocks,
                                shuffle_run=self.cfg.shuffle_run, **kw)

    def _stats_scale(self) -> float | None:
        """Input scale implied by the statistics (for ``input_scaling: stats``)."""
        if self.mode in ("unit_mean_norm", "standardize"):
            return 1.0  # both give E||x||^2 ~ d_model already
        try:
            from ..preprocess import load_stats

            stats = load_stats(self.stats_dir / "stats.nc")
            mean_norm = float(stats["mean_norm"].sel(hook=self.hook))
        except (UserError, KeyError):
            return None
        return math.sqrt(self.info.d_model) / mean_norm if mean_norm > 0 else None

    def train(self, ckpt: Path, tb_dir: Path, progress: Any) -> Any:
        from ..learners.trainer import Trainer

        loader, settings = self._setup()
        return Trainer(self.learner, loader, settings, checkpoint=ckpt, tb_dir=tb_dir,
                       progress=progress, **self._hooks()).run()

    def train_sweep(self, members: list[tuple[str, Any]], ckpt: Path, tb_dir: Path,
                    progress: Any) -> Any:
        from ..learners.sweep import SweepTrainer

        loader, settings = self._setup()
        return SweepTrainer(members, loader, settings, checkpoint=ckpt,
                            tb_dir=lambda name: tb_dir / name, progress=progress,
                            **self._hooks()).run()

    def _hooks(self) -> dict[str, Any]:
        return {"init_sample": self._sample, "eval_batches": self._eval_batches,
                "norm_scale": self.norm_scale, "stats_scale": self._stats_scale(),
                "downstream": self.downstream, "downstream_every": self.cfg.downstream_every}

    def _setup(self) -> tuple[Any, Any]:
        """The training loader and settings (and the normaliser's shift and scale)."""
        import torch

        from ..learners.trainer import TrainSettings

        cfg, lc = self.cfg, self.learner.config
        probe = self.loader(self.train_songs, lc.batch_size, prefetch=0)
        self.n_train = probe.n_tokens
        self.batch_size = min(lc.batch_size, probe.n_tokens)
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
        _warn_if_short(self.hook, steps, float(lc.lr))
        settings = TrainSettings(steps=steps, log_every=cfg.log_every,
                                 checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                                 dead_window_tokens=cfg.dead_window_tokens,
                                 dense_threshold=cfg.dense_threshold, device=self.device,
                                 seed=self.seed, name=self.hook)
        return loader, settings

    def _sample(self) -> Any:
        n = min(self.learner.config.init_sample_tokens, self.n_train)
        loader = self.loader(self.train_songs, n, seed=self.seed + 1, prefetch=0)
        return next(iter(loader))

    def _open_eval_loader(self) -> Any:
        """The held-out loader, opened before training starts: opening a store makes
        netCDF calls outside the loader's lock, which must not overlap the training
        loader's reading thread (intermittent crashes otherwise)."""
        if not self.held_songs:
            return None
        try:
            return self.loader(self.held_songs, 4096, shuffle=False, prefetch=1)
        except UserError:  # the held-out songs have no selected tokens
            return None

    def _eval_batches(self) -> Any:
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

    def describe(self, result: Any, ctx: Any) -> dict[str, Any]:
        """The ``config.json`` fields beyond the architecture."""
        from ..version import __version__
        from ..jsonio import to_jsonable

        m = self.info.manifest
        attrs = m.get("attrs", {})
        manifest_sha = hashlib.sha256((self.info.path / "store.json").read_bytes()).hexdigest()
        model_cfg = attrs.get("model_config") or {}
        return {
            "hook_point": self.hook,
            "learner": {"name": self.learner.name, "config": to_jsonable(self.learner.config)},
            "normalization": {"loader": self.normalizer, "input_scale": result.input_scale,
                              "folded": True, "stats_dir": str(self.stats_dir) if self.mode != "none" else None},
            "training": {"steps": result.steps, "tokens": result.tokens, "batch_size": self.batch_size,
                         "seed": self.seed, "device": self.device, "filters": to_jsonable(self.cfg.filters),
                         "holdout_fraction": self.cfg.holdout_fraction,
                         "holdout_songs": [self.info.songs[i] for i in self.held_songs],
                         "train_songs": len(self.train_songs), "train_tokens": self.n_train,
                         "stage_config": to_jsonable(self.cfg), "fingerprint": ctx.fingerprint},
            "data": {"store_path": str(self.info.path), "store_id": m["store_id"],
                     "store_manifest_sha256": manifest_sha, "n_tokens": self.info.n_tokens,
                     "dataset": attrs.get("dataset"), "split": attrs.get("split"),
                     "events": attrs.get("events")},
            "model": {"name": "mmt", "sha256": attrs.get("model_sha256"), "source": attrs.get("source"),
                      "path": attrs.get("model_path"),
                      "context_size": model_cfg.get("max_seq_len") if isinstance(model_cfg, dict) else None},
            "input": {"space": "raw", "mean_norm": self._raw_mean_norm()},
            "music_interpret_version": __version__,
        }

    def _raw_mean_norm(self, tokens: int = 65_536) -> float:
        """Mean L2 norm of raw training activations (what ``encode`` checks batches against)."""
        import torch

        from ..loader import ActivationLoader

        loader = ActivationLoader(self.info.path, self.hook, min(tokens, self.n_train),
                                  filters={**self.cfg.filters, "song": self.train_songs},
                                  seed=self.seed, prefetch=0)
        try:
            return float(torch.linalg.vector_norm(next(iter(loader)), dim=1).mean())
        finally:
            loader.close()


class _DownstreamSource:
    """The pipeline's model (loaded once) and note dataset, for downstream evaluations."""

    def __init__(self, adapter: Any, dataset: Any, notes_only: bool) -> None:
        self.adapter, self.dataset, self.notes_only = adapter, dataset, notes_only

    @classmethod
    def setup(cls, ctx: Any, cfg: TrainConfig, info: Any, device: str) -> _DownstreamSource | None:
        """Load the model and open the dataset; None (with a note) when ``auto`` cannot."""
        import sys

        if cfg.downstream == "off" or cfg.holdout_fraction <= 0:
            return None
        header = ctx.pipeline.header
        attrs = info.manifest.get("attrs", {})

        def skip(reason: str) -> None:
            if cfg.downstream == "on":
                raise UserError(f"train.downstream: {reason}")
            print(f"train: no downstream evaluation ({reason})", file=sys.stderr, flush=True)

        from ..adapters.mmt.dataset import open_dataset

        if header.model is not None and header.data is not None:
            adapter = header.model.adapter.build(ctx.registry)
            model_path, data_path, data_split = header.model.path, header.data.path, header.data.split
        else:  # no pipeline model/data (a seed command): those the store was extracted from
            from ..stores.provenance import recorded_inputs

            recorded = recorded_inputs(attrs)
            if isinstance(recorded, str):
                skip(f"the pipeline names no model and data, and {recorded}")
                return None
            cls_ = ctx.registry.find("model_adapter", recorded.adapter)
            if cls_ is None:
                skip(f"model adapter {recorded.adapter!r} recorded by the store is not installed")
                return None
            adapter = cls_(cls_.Config())
            model_path, data_path, data_split = recorded.model_path, recorded.data_path, "all"
            print(f"train: downstream evaluation on the model and data the store was extracted "
                  f"from ({model_path}, {data_path})", file=sys.stderr, flush=True)
        adapter.load(model_path, device=device)
        stored = attrs.get("model_sha256")
        if stored and stored != adapter.checkpoint_sha256:
            skip(f"the store {info.path} was extracted from another checkpoint than {model_path}")
            return None
        split = attrs.get("split") if attrs.get("split") in ("all", "train", "valid", "test") else None
        dataset = open_dataset(data_path, split or data_split)
        return cls(adapter, dataset, attrs.get("events") == "notes")

    def evaluator(self, hook: str, songs: list[str], cfg: TrainConfig) -> Any:
        from ..learners.downstream import DownstreamEvaluator, DownstreamSettings

        settings = DownstreamSettings(cfg.downstream_windows, cfg.downstream_tokens,
                                      cfg.downstream_batch_size)
        names = [n for n in songs if n in self.dataset]
        return DownstreamEvaluator.for_songs(self.adapter, hook, self.dataset.read, names, settings,
                                             notes_only=self.notes_only)
