"""One training loop for one or many dictionaries: streaming batches, logging, evaluation,
checkpoints.

:class:`Trainer` trains one learner, or several members (``[(label, learner), ...]``:
a sweep, several recipes) on the SAME batches: each batch is read once and every member
takes one optimiser step on it; each member has its own TensorBoard folder, evaluation
and downstream evaluation, and one checkpoint holds them all.

* Batches come from an endless :class:`~music_interpret.loader.ActivationLoader` (already
  normalised as configured) and are multiplied by the learner's input scale.
* Metrics are accumulated on the device and read back only every ``log_every`` steps
  (no per-step ``.item()``); TensorBoard tags: ``train/{loss,mse,fvu,l0,l1,aux}``,
  ``sparsity/{dead_fraction,dense_fraction,log10_density}``, ``opt/{lr,l1_coeff,grad_norm}``,
  ``eval/*``, and ``add_hparams`` at the end.
* A checkpoint (weights, optimiser, RNG states, loader position, firing tracker, step)
  is written every ``checkpoint_every`` steps to a temporary name and renamed. Running
  again with the same checkpoint path continues from it; on CPU with a fixed seed the
  final weights equal those of an uninterrupted run.
* A non-finite loss is noticed at the next log or checkpoint step (the first bad step
  is recorded on the device); training stops with a :class:`UserError` naming that
  step. Checkpoints are only written after checking the loss, so the one on disk is
  the last good one.
* ``downstream`` (optional): a callable ``(model, input_scale) -> dict`` run at the end
  (and every ``downstream_every`` steps), e.g. the spliced-model losses of
  :mod:`~music_interpret.learners.downstream`; its result is ``TrainResult.downstream``
  and its scalars go to TensorBoard as ``downstream/*``.
* Data-parallel under ``torchrun`` (:mod:`~music_interpret.learners.ddp`):
  each rank trains on its share of every global batch through DDP; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..jsonio import temporary_name, writing
from . import ddp as D
from . import metrics as M
from .dictionary import Dictionary, Learner
from .trainer_reports import SCALARS, TrainerReports


@dataclass
class TrainSettings:
    """How long and how observably to train (the learner's config holds the recipe)."""

    steps: int
    log_every: int = 100
    checkpoint_every: int = 1000
    eval_every: int | None = None
    dead_window_tokens: int = 1_000_000
    dense_threshold: float = 0.1
    device: str = "cpu"
    seed: int = 0
    name: str = ""  # shown in messages (the hook point)


@dataclass
class TrainResult:
    """The trained dictionary in training space, and how to get back to raw space."""

    model: Dictionary
    input_scale: float
    steps: int
    tokens: int
    metrics: dict[str, Any] = field(default_factory=dict)
    downstream: dict[str, Any] = field(default_factory=dict)


def member_settings(settings: TrainSettings, name: str, learner: Learner) -> TrainSettings:
    """The run's settings for one member of several: its name, and its own seed when it has
    one (the seed of the member's initialisation; the batches keep the run's)."""
    seed = settings.seed if learner.config.seed is None else int(learner.config.seed)
    return dataclasses.replace(settings, name=f"{settings.name} {name}".strip(), seed=seed)


@dataclass
class _Member:
    """One dictionary being trained: its recipe, model, optimiser and running statistics."""

    label: str
    learner: Learner
    s: TrainSettings  # name and seed of this member
    tb_dir: Path | None
    model: Dictionary
    opt: torch.optim.Optimizer
    tracker: M.FiringTracker
    scale: float = 1.0
    writer: Any = None
    loss: Any = None  # learner.loss, or the DDP-wrapped loss module
    autocast: Any = None
    compiled: bool = False
    clip: float = math.inf
    dead_window: int = 0
    acc: Any = None
    bad: Any = None
    n_acc: int = 0
    tokens: int = 0


class Trainer(TrainerReports):
    """Trains ``learner`` (or every ``(label, learner)`` of a list) on ``loader`` (endless,
    with ``state_dict``) under ``settings``.

    ``tb_dir``: a folder, or for several members ``tb_dir(label)`` (a folder or None).
    ``init_sample()`` returns normalised training tokens for the input scale and the
    ``b_dec`` initialisation; ``eval_batches()`` yields normalised held-out batches;
    ``norm_scale`` is the loader normaliser's per-dimension scale (for the raw-space FVU);
    ``stats_scale`` the input scale the preprocess statistics imply; ``downstream(model,
    input_scale)`` evaluates the training-space model downstream (see the module doc).
    :meth:`run` returns the result of a single learner, :meth:`run_all` ``{label: result}``.
    """

    def __init__(self, learner: Learner | Sequence[tuple[str, Learner]], loader: Any,
                 settings: TrainSettings, *, checkpoint: Path,
                 tb_dir: Path | None | Callable[[str], Path | None],
                 init_sample: Callable[[], torch.Tensor],
                 eval_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
                 norm_scale: torch.Tensor | None = None, stats_scale: float | None = None,
                 progress: Callable[..., Any] | None = None,
                 downstream: Callable[[Dictionary, float], dict[str, Any]] | None = None,
                 downstream_every: int | None = None) -> None:
        self.several = not isinstance(learner, Learner)
        if self.several:
            recipes = [(str(label), lrn) for label, lrn in learner]  # type: ignore[union-attr]
            if not recipes:
                raise UserError("train: no dictionary to train")
            if len({lrn.config.batch_size for _, lrn in recipes}) != 1:
                raise UserError("sweep: every member must use the same batch_size")
            self.recipes = [(label, lrn, member_settings(settings, label, lrn)) for label, lrn in recipes]
        else:
            self.recipes = [("", learner, settings)]  # type: ignore[list-item]
        self.learner = self.recipes[0][1]
        self.loader, self.s = loader, settings
        self.checkpoint, self.tb_dir = Path(checkpoint), tb_dir
        self.init_sample, self.eval_batches = init_sample, eval_batches
        self.norm_scale, self.stats_scale, self.progress = norm_scale, stats_scale, progress
        self.downstream, self.downstream_every = downstream, downstream_every
        self.device = torch.device(settings.device)
        self.last_checkpoint_step = 0
        self.dist = D.DistInfo()

    # -- set-up ---------------------------------------------------------------------------

    def _input_scale(self, learner: Learner, sample: torch.Tensor) -> float:
        how, d = learner.config.input_scaling, sample.shape[1]
        if how == "none":
            return 1.0
        if how == "stats" and self.stats_scale is not None:
            return float(self.stats_scale)
        mean_norm = float(sample.double().norm(dim=1).mean())
        return math.sqrt(d) / mean_norm if mean_norm > 0 else 1.0

    def _build(self, label: str, learner: Learner, s: TrainSettings) -> _Member:
        """A fresh model (seeded with the member's seed), its optimiser and firing tracker."""
        cfg = learner.config
        model = learner.build(self.loader.d_model, torch.Generator().manual_seed(s.seed)).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                               fused=True if self.device.type == "cuda" else None)  # one kernel
        tb = self.tb_dir(label) if callable(self.tb_dir) else self.tb_dir
        return _Member(label, learner, s, tb, model, opt, M.FiringTracker(model.d_sae, self.device))

    def _fresh(self, m: _Member, sample: torch.Tensor) -> None:
        m.scale = self._input_scale(m.learner, sample)
        m.learner.init_b_dec(m.model, sample * m.scale)

    @staticmethod
    def _member_state(m: _Member) -> dict[str, Any]:
        return {"model": m.model.state_dict(), "optimizer": m.opt.state_dict(),
                "input_scale": m.scale, "since_fired": m.tracker.since_fired, "tokens": m.tokens,
                "learner_state": m.learner.state_dict()}

    @staticmethod
    def _restore(m: _Member, state: dict[str, Any]) -> None:
        m.model.load_state_dict(state["model"])
        m.opt.load_state_dict(state["optimizer"])
        m.tracker.since_fired.copy_(state["since_fired"])
        m.scale = float(state["input_scale"])
        m.tokens = int(state.get("tokens", 0))  # tokens trained before the resume
        m.learner.load_state_dict(dict(state.get("learner_state", {})))

    def _prepare(self, m: _Member, start: int) -> None:
        """Writer, compilation, autocast, DDP wrapper and accumulators of a member."""
        cfg = m.learner.config
        m.writer = self._writer(m.tb_dir, start) if self.dist.main else None
        m.compiled = bool(cfg.compile and self.device.type == "cuda")
        if m.compiled:
            m.model.run = torch.compile(m.model.run)  # type: ignore[method-assign]
        m.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=bool(cfg.bf16 and self.device.type == "cuda"))
        m.dead_window = self.dead_window(m.learner)
        m.clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else math.inf
        learner = m.learner
        m.loss = (D.wrap(m.model, learner, self.device) if self.dist.enabled
                  else lambda x, step, total, dead: learner.loss(m.model, x, step, total, dead))
        m.acc = torch.zeros(len(SCALARS), device=self.device)
        m.bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def dead_window(self, learner: Learner | None = None) -> int:
        """Training tokens without firing after which a latent counts as dead: the learner's
        own ``dead_tokens`` when it sets one, else the settings' ``dead_window_tokens``."""
        own = getattr((learner or self.learner).config, "dead_tokens", None)
        return int(own) if own is not None else int(self.s.dead_window_tokens)

    def config_key(self) -> str:
        """What a checkpoint must record to be resumed by this trainer (the recipes)."""
        if not self.several:
            return repr(self.learner.config)
        return repr([(label, repr(lrn.config)) for label, lrn, _ in self.recipes])

    # -- checkpoints -----------------------------------------------------------------------

    def _save(self, step: int, members: list[_Member]) -> None:
        """Write the checkpoint atomically; the one before it is kept as ``<name>.prev``, so
        that a checkpoint damaged later still leaves one to resume from. One learner's state
        sits at the top level, several members' under ``members``."""
        self.last_checkpoint_step = step
        if not self.dist.main:
            return
        payload = ({"members": [self._member_state(m) for m in members]} if self.several
                   else self._member_state(members[0]))
        state = {
            "step": step, **payload, "loader": dict(self.loader.state_dict()),
            "learner": self.learner.name, "learner_config": self.config_key(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(self.checkpoint)
        with writing(self.checkpoint, tmp):
            torch.save(state, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self._previous)
            os.replace(tmp, self.checkpoint)

    @property
    def _previous(self) -> Path:
        return self.checkpoint.with_name(self.checkpoint.name + ".prev")

    def _load(self) -> dict[str, Any] | None:
        """The newest loadable checkpoint of these recipes (the previous one when the latest
        is damaged), or None to start afresh; UserError when checkpoints exist but none loads."""
        problems = []
        name = self.recipes[0][2].name
        for path in (self.checkpoint, self._previous):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a training checkpoint")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
                problems.append(str(path))
                print(f"train {name}: warning: cannot read the checkpoint {path} "
                      f"({type(exc).__name__}); trying an older one", file=sys.stderr, flush=True)
                continue
            if state.get("learner") != self.learner.name or state.get("learner_config") != self.config_key():
                return None  # another recipe: start afresh
            return state
        if problems:
            raise UserError(f"{self.checkpoint}: damaged checkpoint and no usable earlier one; rerun "
                            f"with --force, or delete {self.checkpoint.parent}, to start afresh")
        return None

    def _resume(self, state: dict[str, Any], members: list[_Member]) -> int:
        """Members, loader position and RNG states of a checkpoint; returns its step."""
        for m, st in zip(members, state["members"] if self.several else [state], strict=True):
            self._restore(m, st)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["rng_cuda"]])
        start = int(state["step"])
        self.last_checkpoint_step = start
        print(f"train {members[0].s.name}: resuming from the checkpoint at step {start}/{self.s.steps}",
              file=sys.stderr, flush=True)
        return start

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train the single learner; its result."""
        if self.several:
            raise TypeError("Trainer.run: several members are trained with run_all()")
        return self.run_all()[""]

    def run_all(self) -> dict[str, TrainResult]:
        """Train every member on the same batches; ``{label: result}`` in member order."""
        s = self.s
        self.dist = D.info()
        torch.manual_seed(s.seed)
        members = [self._build(label, lrn, ms) for label, lrn, ms in self.recipes]
        state = self._load()
        if state is None:
            start = 0
            sample = self.init_sample().to(self.device).float()
            for m in members:
                self._fresh(m, sample)
        else:
            start = self._resume(state, members)
        for m in members:
            self._prepare(m, start)
            self._warn_dead_window(m)
        bar = self.progress(total=s.steps, initial=start, unit="step") if self.progress else None
        batches = iter(self.loader)
        try:
            for step in range(start, s.steps):
                x = next(batches).to(self.device, non_blocking=True).float()
                done = step + 1
                for m in members:
                    self._step(m, x, step)
                    self._after_step(m, done, step, None if self.several else bar)
                if bar is not None:
                    bar.update(1)
                if done % s.checkpoint_every == 0 and done < s.steps:
                    for m in members:
                        self._check(m)
                    self._save(done, members)
            for m in members:
                self._check(m)
        finally:
            if bar is not None:
                bar.close()
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
        return {m.label: self._finish(m) for m in members}

    def _warn_dead_window(self, m: _Member) -> None:
        total = self.s.steps * int(m.learner.config.batch_size)
        if m.dead_window >= total and self.dist.main:
            print(f"train {m.s.name}: warning: the dead-latent window ({m.dead_window:,} tokens) is "
                  f"as long as the whole run ({total:,} tokens): no latent can count as dead"
                  + (", so AuxK never acts" if hasattr(m.learner.config, "k_aux") else ""),
                  file=sys.stderr, flush=True)

    def _step(self, m: _Member, batch: torch.Tensor, step: int) -> None:
        """One optimiser step of member ``m`` on (this rank's share of) a global batch."""
        s, learner = self.s, m.learner
        x = D.shard(batch, self.dist) * m.scale
        for group in m.opt.param_groups:
            group["lr"] = learner.lr_at(step, s.steps)
        with m.autocast:
            out = m.loss(x, step, s.steps, m.tracker.dead(m.dead_window))
        m.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        learner.before_step(m.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(m.model.parameters(), m.clip)
        m.opt.step()
        learner.after_step(m.model)
        with torch.no_grad():
            codes, fired = out["codes"].detach(), out.get("fired")
            if fired is None:  # a sparse step counts them from its active pairs instead
                fired = (codes != 0).sum(0)
            self._track(m.tracker, fired, codes.shape[0])
            m.acc += torch.stack([out["loss"].detach().float(), out["mse"].detach(),
                                  M.fvu(x, out["recon"].detach()),
                                  fired.sum().float() / max(codes.shape[0], 1),
                                  out["l1"].detach(), out["aux"].detach().float(),
                                  grad_norm.float()])
            m.bad = torch.where((m.bad < 0) & ~torch.isfinite(out["loss"].detach()),
                                torch.full_like(m.bad, step + 1), m.bad)
        m.n_acc, m.tokens = m.n_acc + 1, m.tokens + batch.shape[0]

    def _track(self, tracker: M.FiringTracker, fired: torch.Tensor, n: int) -> None:
        """Update the firing tracker with this batch's per-latent firing counts ``fired`` over
        ``n`` tokens (with the counts of all ranks when distributed)."""
        if self.dist.enabled:
            fired, n = D.all_reduce_(fired.float()), n * self.dist.world
        tracker.add_counts(fired, n)

    def _after_step(self, m: _Member, done: int, step: int, bar: Any = None) -> None:
        """Logging, evaluation and downstream evaluation due after step ``done``."""
        s = self.s
        if done % s.log_every == 0 or done == s.steps:
            values = (D.all_reduce_(m.acc, "mean") / m.n_acc).tolist()
            self._check(m)
            self._log(m, done, values, step)
            if bar is not None:
                bar.set_postfix(mse=f"{values[1]:.4g}", l0=f"{values[3]:.1f}")
            m.acc.zero_()
            m.n_acc = 0
        if s.eval_every and done % s.eval_every == 0 and done < s.steps:
            self._eval(m.model, m.scale, m.writer, done)
        if self.downstream_every and done % self.downstream_every == 0 and done < s.steps:
            self._downstream(m, done)

    def _finish(self, m: _Member) -> TrainResult:
        if m.compiled:
            del m.model.run  # back to the plain method
        metrics = self._eval(m.model, m.scale, m.writer, self.s.steps) if self.eval_batches else {}
        downstream = self._downstream(m, self.s.steps)
        if m.writer is not None:
            self._hparams(m, metrics, downstream)
            m.writer.close()
        return TrainResult(m.model, m.scale, self.s.steps, m.tokens, metrics, downstream)

    def _check(self, m: _Member) -> None:
        """UserError naming the first step whose loss was NaN/Inf (see the module doc)."""
        first = int(D.all_reduce_(m.bad.clone(), "max"))
        if first >= 0:
            where = (f"last good checkpoint: step {self.last_checkpoint_step} ({self.checkpoint})"
                     if self.last_checkpoint_step else "no checkpoint was written before it")
            raise UserError(f"training {m.s.name or 'dictionary'}: the loss is NaN/Inf at step "
                            f"{first}; {where}; lower the learning rate or check the activations")
