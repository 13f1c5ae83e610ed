"""What the dictionary trainer reports: TensorBoard scalars and histograms, the held-out
evaluation, the downstream evaluation and the hyperparameters (mixed into
:class:`~music_interpret.learners.trainer.Trainer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import metrics as M

if TYPE_CHECKING:
    from . import ddp as D
    from .dictionary import Dictionary
    from .trainer import TrainSettings, _Member

SCALARS = ("loss", "mse", "fvu", "l0", "l1", "aux", "grad_norm")


class TrainerReports:
    """Logging and evaluation of the members of a :class:`~.trainer.Trainer`."""

    s: TrainSettings
    device: torch.device
    dist: D.DistInfo
    eval_batches: Callable[[], Iterable[torch.Tensor]] | None
    norm_scale: torch.Tensor | None
    downstream: Callable[[Dictionary, float], dict[str, Any]] | None

    @staticmethod
    def _writer(tb_dir: Path | None, start: int) -> Any:
        if tb_dir is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(tb_dir), purge_step=start if start else None)

    def _log(self, m: _Member, done: int, values: list[float], step: int) -> None:
        dens = m.tracker.reset_counts()
        writer = m.writer
        if writer is None:
            return
        for name, value in zip(SCALARS, values, strict=True):
            tag = f"opt/{name}" if name == "grad_norm" else f"train/{name}"
            writer.add_scalar(tag, value, done)
        writer.add_scalar("sparsity/dead_fraction", float(m.tracker.dead(m.dead_window).float().mean()), done)
        writer.add_scalar("sparsity/dense_fraction", float(M.dense_fraction(dens, self.s.dense_threshold)), done)
        writer.add_histogram("sparsity/log10_density", M.log10_density(dens).cpu(), done)
        writer.add_scalar("opt/lr", m.learner.lr_at(step, self.s.steps), done)
        writer.add_scalar("opt/l1_coeff", m.learner.l1_coeff_at(step, self.s.steps), done)

    @torch.no_grad()
    def _eval(self, model: Dictionary, scale: float, writer: Any, done: int) -> dict[str, Any]:
        if self.eval_batches is None or not self.dist.main:
            return {}
        acc = M.EvalAccumulator(model.d_in, model.d_sae, self.device)
        raw = (self.norm_scale.to(self.device, torch.float64) * scale
               if self.norm_scale is not None else None)
        for x in self.eval_batches():
            x = x.to(self.device).float() * scale
            _, f, recon = model.run(x)
            acc.update(x, recon, f, raw)
        if acc.n == 0:
            return {}
        result = acc.result(self.s.dense_threshold)
        if writer is not None:
            for key in ("fvu", "fvu_raw", "mse", "l0", "l1", "dead_fraction", "dense_fraction"):
                if isinstance(result.get(key), float):
                    writer.add_scalar(f"eval/{key}", result[key], done)
        return {"step": done, **result}

    @torch.no_grad()
    def _downstream(self, m: _Member, done: int) -> dict[str, Any]:
        if self.downstream is None or not self.dist.main:
            return {}
        from .downstream import scalars

        result = self.downstream(m.model, m.scale)
        if result and m.writer is not None:
            for key, value in scalars(result).items():
                m.writer.add_scalar(f"downstream/{key}", value, done)
        return {"step": done, **result} if result else {}

    def _hparams(self, m: _Member, metrics: dict[str, Any],
                 downstream: dict[str, Any] | None = None) -> None:
        writer = m.writer
        hp: dict[str, Any] = {"learner": m.learner.name, "steps": self.s.steps}
        for key, value in vars(m.learner.config).items():
            hp[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        final = {f"hparam/{k}": v for k, v in metrics.items()
                 if k in ("fvu", "l0", "dead_fraction", "dense_fraction") and isinstance(v, float)}
        total = (downstream or {}).get("recovered", {}).get("total")
        if isinstance(total, float):
            final["hparam/total_recovered"] = total
        writer.add_hparams(hp, final or {"hparam/steps": float(self.s.steps)}, run_name=".")
