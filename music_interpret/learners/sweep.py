"""Sweeps: several dictionaries trained on the SAME batches in one pass over the data.

:func:`sweep_learners` turns a learner and ``{param: [values]}`` (e.g. ``l1_coeff`` of
``relu_l1`` or ``k`` of ``topk``), or a grid over two options (``{d_sae: [256, 1024],
seed: [0, 1]}``: every combination), into one learner per point, labelled
``d_sae=256,seed=0``; the :class:`~music_interpret.learners.trainer.Trainer` of these
members (:class:`SweepTrainer`) reads each batch once and takes one optimiser step of
every member on it (each with its own TensorBoard folder, evaluation and downstream
evaluation; the checkpoint holds all members).
Members share the batches and the run's seed, so they start from the same
initialisation, except that a member whose ``seed`` is swept is initialised from its
own seed (the batches stay the run's). :func:`curve` gives the cheap L0-FVU curve of
the results.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UserError
from .dictionary import Learner
from .trainer import Trainer, TrainResult, TrainSettings, member_settings  # noqa: F401 - re-exported

MAX_OPTIONS = 2
FIXED = ("batch_size",)  # the members share batches


def _is_int_field(config: Any, param: str) -> bool:
    """Whether option ``param`` of a learner config holds integers (``int``, ``int | None``)."""
    for f in dataclasses.fields(config):
        if f.name == param:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            return "int" in kind and "float" not in kind and "bool" not in kind
    return False


def _cast(value: Any, is_int: bool) -> Any:
    if is_int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise UserError(f"sweep: {value!r} is not an integer")
        return int(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def label(param: str, value: Any) -> str:
    """Folder name part of one option, e.g. ``l1_coeff=0.5`` or ``k=32``."""
    return f"{param}={value:g}" if isinstance(value, float) else f"{param}={value}"


def grid_points(learner: Learner, sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The checked points of a sweep: one ``{param: value}`` per combination, in the order of
    the options (the last option varies fastest)."""
    if not 1 <= len(sweep) <= MAX_OPTIONS:
        raise UserError(f"sweep: give one or two options to sweep, got {', '.join(sweep) or 'none'}")
    names = {f.name for f in dataclasses.fields(learner.config)}
    axes = []
    for param, values in sweep.items():
        if param not in names:
            raise UserError(f"sweep: {param!r} is not an option of learner {learner.name!r}")
        if param in FIXED:
            raise UserError(f"sweep: {param!r} cannot vary within a sweep (the members share batches)")
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"sweep.{param}: expected a non-empty list of distinct values")
        cast = [_cast(v, _is_int_field(learner.config, param)) for v in values]
        if len(set(cast)) != len(cast):
            raise UserError(f"sweep.{param}: expected a non-empty list of distinct values")
        axes.append([(param, v) for v in cast])
    return [dict(point) for point in itertools.product(*axes)]


def member_label(point: Mapping[str, Any]) -> str:
    """``d_sae=256,seed=0``: the folder of a sweep member."""
    return ",".join(label(p, v) for p, v in point.items())


def sweep_learners(learner: Learner, sweep: Mapping[str, Sequence[Any]]) -> list[tuple[str, Learner]]:
    """One (label, learner) per point of the sweep (the other options as ``learner``)."""
    out = []
    for point in grid_points(learner, sweep):
        name = member_label(point)
        try:
            config = dataclasses.replace(learner.config, **point)
        except ValueError as exc:
            raise UserError(f"sweep {name}: {exc}") from None
        out.append((name, type(learner)(config)))
    return out


class SweepTrainer:
    """Trains every ``(label, learner)`` of ``members`` on the batches of one ``loader``: a
    :class:`~music_interpret.learners.trainer.Trainer` of several members.

    The keyword arguments are those of :class:`Trainer`; ``tb_dir(label)`` gives each
    member's TensorBoard folder (or None).
    """

    def __init__(self, members: Sequence[tuple[str, Learner]], loader: Any, settings: TrainSettings,
                 **kwargs: Any) -> None:
        self.trainer = Trainer(list(members), loader, settings, **kwargs)

    def run(self) -> dict[str, TrainResult]:
        """Train all members; returns {label: result}."""
        return self.trainer.run_all()


def curve(points: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The L0-FVU curve: one row per member (label, l0, fvu, ...), sorted by L0."""
    rows = []
    for name, metrics in points.items():
        held = metrics.get("holdout") or {}
        down = (metrics.get("downstream") or {}).get("recovered") or {}
        row = {"label": name, **{k: held.get(k) for k in ("l0", "fvu", "fvu_raw", "dead_fraction")}}
        row["total_recovered"] = down.get("total")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["l0"] is None or not math.isfinite(r["l0"]), r["l0"] or 0.0))
