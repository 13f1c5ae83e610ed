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

Under ``torchrun`` (:mod:`music_interpret.ranks`) every rank trains on its share of each
global batch (``DistributedDataParallel``: NCCL on GPUs, gloo on CPU) and rank 0 writes.

Checkpoints live in ``checkpoints/<hook>/`` while a hook trains; after a crash the
engine hands the partial folder back and training continues from them. A hook whose
``config.json`` (``sweep.json`` for a sweep) exists is complete and is not trained again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import Pipeline, PluginRef
from ..errors import UserError
from ..interfaces import Stage
from ..normalize import AUTO, NONE, ModeOrAuto
from ..stats import NORMALIZATION_FILE

if TYPE_CHECKING:
    from ..context import StageContext
    from ..interfaces import StoreReader
    from ..learners.dictionary import Learner
    from ..learners.job import DownstreamSource
    from ..plugins import PluginRegistry

SWEEP_FILE = "sweep.json"


@dataclass
class TrainConfig:
    """Options of ``train`` (the recipe itself is the learner's config)."""

    learner: PluginRef = field(default="relu_l1", metadata={"plugin": "dictionary_learner"})  # type: ignore[assignment]
    store: Path | None = field(default=None, metadata={"input": True})
    hooks: list[str] = field(default_factory=list)
    normalization: ModeOrAuto = AUTO
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
    distributed = True  # under torchrun: data-parallel, rank 0 writes (music_interpret.ranks)

    # -- inputs ---------------------------------------------------------------------------

    def _store(self, ctx: StageContext) -> Path:
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

    def inputs(self, ctx: StageContext) -> list[Path]:
        store = self.config.store or ctx.upstream.get("extract")
        if store is None:
            return []
        store = Path(store)
        files = [store / "store.json"]
        if self.config.normalization != NONE or self.config.stats is not None:
            stats_dir = self._stats_dir(store)
            files += [stats_dir / "stats.nc", stats_dir / NORMALIZATION_FILE]
        return files

    def _mode(self, stats_dir: Path) -> str:
        mode = self.config.normalization
        if mode != AUTO:
            return mode
        try:
            return str(json.loads((stats_dir / NORMALIZATION_FILE).read_text())["mode"])
        except FileNotFoundError:
            return NONE
        except (OSError, ValueError, KeyError):
            raise UserError(f"{stats_dir / NORMALIZATION_FILE}: unreadable normalisation file") from None

    # -- checks before anything runs ----------------------------------------------------

    def check(self, pipeline: Pipeline, registry: PluginRegistry) -> list[str]:
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

    def _planned_d_in(self, pipeline: Pipeline, registry: PluginRegistry) -> int | None:
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

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from ..learners.job import DownstreamSource

        cfg: TrainConfig = self.config
        info = ctx.open_store(self._store(ctx))
        hooks = list(cfg.hooks) or info.hooks
        unknown = [h for h in hooks if h not in info.hooks]
        if unknown:
            raise UserError(f"train.hooks: {', '.join(unknown)} not in the store {info.path} "
                            f"(extracted: {', '.join(info.hooks)})")
        device = cfg.device or ctx.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"train.device: {device!r} requested but CUDA is not available")
        learner = cfg.learner.build(ctx.registry)
        if learner.config.batch_size % ctx.dist.world:
            raise UserError(f"train.learner.batch_size: {learner.config.batch_size} does not split "
                            f"evenly over the {ctx.dist.world} ranks of this torchrun")
        seed = learner.config.seed if learner.config.seed is not None else ctx.seed
        if cfg.sweep:
            from ..learners.sweep import sweep_learners

            sweep_learners(learner, cfg.sweep)  # check the options before any training
        downstream = DownstreamSource.setup(ctx, cfg, info, device)
        summary: dict[str, Any] = {"store": str(info.path), "learner": learner.name, "hooks": {}}
        for hook in hooks:
            summary["hooks"][hook] = self._train_hook(ctx, info, hook, learner, device, seed, downstream)
        if ctx.dist.enabled:
            summary["ranks"] = ctx.dist.world
        return summary

    def _train_hook(self, ctx: StageContext, info: StoreReader, hook: str, learner: Learner,
                    device: str, seed: int, downstream: DownstreamSource | None) -> dict[str, Any]:
        """One dictionary (or one per sweep member) of ``hook``; skipped when complete."""
        from .. import ranks
        from ..jsonio import write_json_atomic
        from ..learners.io import CONFIG, METRICS, save_dictionary
        from ..learners.job import HookJob, summary_of, warn_if_poor
        from ..learners.sweep import curve, grid_points, sweep_learners

        cfg: TrainConfig = self.config
        out_dir = ctx.work_dir / "dictionaries" / hook
        ranks.barrier()  # under torchrun: every rank sees the same finished hooks
        if cfg.sweep and (out_dir / SWEEP_FILE).exists():  # finished before an interruption
            done = json.loads((out_dir / SWEEP_FILE).read_text())
            return {"sweep": done["param"], "points": done["curve"]}
        if not cfg.sweep and (out_dir / CONFIG).exists():
            return summary_of(json.loads((out_dir / METRICS).read_text()))
        stats_dir = self._stats_dir(info.path)
        job = HookJob(cfg, info, hook, learner, device, seed, stats_dir, self._mode(stats_dir))
        if downstream is not None:
            job.downstream = downstream.for_job(job)
        tb = ctx.work_dir / "tensorboard" / hook
        if cfg.sweep:
            members = sweep_learners(learner, cfg.sweep)
            ckpt = ctx.work_dir / "checkpoints" / hook / "sweep.pt"
            results = job.train(members, ckpt, lambda name: tb / name,
                                lambda **kw: ctx.progress(desc=f"train {hook} sweep", **kw))
        else:
            members = [("", learner)]
            ckpt = ctx.work_dir / "checkpoints" / hook / "checkpoint.pt"
            results = job.train(learner, ckpt, tb, lambda **kw: ctx.progress(desc=f"train {hook}", **kw))
        if not ctx.dist.main:  # under torchrun rank 0 writes the results
            return {}
        params = list(cfg.sweep)
        points = dict(zip([n for n, _ in members], grid_points(learner, cfg.sweep), strict=True)) \
            if cfg.sweep else {}
        done: dict[str, Any] = {}
        for name, member in members:
            result = results[name]
            metrics = {"holdout": result.metrics, "steps": result.steps, "tokens": result.tokens}
            if result.downstream:
                metrics["downstream"] = result.downstream
            config = job.describe(result, member, ctx.fingerprint)
            if cfg.sweep:
                config["sweep"] = {"param": ",".join(params), "params": params, "label": name,
                                   "values": points[name]}
            save_dictionary(out_dir / name if name else out_dir, job.raw(result), config, metrics)
            if not cfg.sweep:
                warn_if_poor(hook, metrics)
            done[name] = metrics
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        if not cfg.sweep:
            return summary_of(done[""])
        summary = {"param": ",".join(params), "params": params,
                   "grid": {p: list(dict.fromkeys(pt[p] for pt in points.values())) for p in params},
                   "members": [{"label": n, "values": points[n]} for n, _ in members],
                   "curve": curve(done)}
        if len(params) == 1:
            summary["values"] = summary["grid"][params[0]]
        write_json_atomic(out_dir / SWEEP_FILE, summary)
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
