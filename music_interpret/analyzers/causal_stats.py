"""Effects, density-matched controls, bootstrap intervals and the verdict of the ``causal`` analyzer.

The definitions are stated in :mod:`music_interpret.analyzers.causal`; this module
computes them from the per-song sums of :mod:`.causal_ablation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .causal_ablation import FIELDS, LabelSpec, LatentSums

LEVEL = 0.95
USED, NOT_USED, INSUFFICIENT = "used", "not used", "insufficient"


@dataclass(frozen=True)
class Rule:
    """When a verdict is given: enough firing positions, songs and controls."""

    min_firing: int = 20
    min_songs: int = 5
    min_controls: int = 3
    bootstrap: int = 1000


def effect_kind(spec: LabelSpec) -> str:
    """``label_prob_drop`` for a label MMT predicts directly, else ``delta_ce_fire:<field>``."""
    return "label_prob_drop" if spec.codes is not None else f"delta_ce_fire:{spec.field}"


def effect(s: LatentSums, spec: LabelSpec, label: int, w: np.ndarray) -> np.ndarray:
    """The effect for weightings ``w`` (m, songs) of the songs, (m,); NaN without firing.

    ``label_prob_drop``: minus the mean change of the label's predicted probability at the
    firing positions; otherwise the mean ΔCE of the label's field (all fields summed for
    ``total``) at the firing positions.
    """
    n = w @ s.n_fire
    if spec.codes is not None:
        num = -(w @ s.dp[:, label])
    elif spec.field in s.fields:
        num = w @ s.dce_fire[:, s.fields.index(spec.field)]
    else:
        num = w @ s.dce_fire.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, num / np.where(n > 0, n, 1.0), np.nan)


def point(s: LatentSums, spec: LabelSpec, label: int) -> float:
    """The effect on all evaluated songs."""
    return float(effect(s, spec, label, np.ones((1, len(s.n_fire))))[0])


def bootstrap_interval(s: LatentSums, spec: LabelSpec, label: int, resamples: int,
                       seed: int) -> list[float] | None:
    """Percentile bootstrap interval (``LEVEL``) of the effect, resampling songs with
    replacement; None without resamples or firing."""
    n_songs = len(s.n_fire)
    if resamples < 1 or n_songs == 0:
        return None
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_songs, np.full(n_songs, 1 / n_songs), size=resamples).astype(float)
    values = effect(s, spec, label, w)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return [float(lo), float(hi)]


def select_controls(density: np.ndarray, latent: int, excluded: set[int], usable: np.ndarray,
                    n: int, seed: int) -> list[int]:
    """The ``n`` latents nearest to ``latent`` in log10 firing density among the ``usable``
    ones not ``excluded`` (ties in a seeded random order)."""
    cand = np.asarray([j for j in np.flatnonzero(usable) if j not in excluded and j != latent])
    if not len(cand) or n < 1:
        return []
    logd = np.log10(np.maximum(density, 1e-12))
    dist = np.abs(logd[cand] - logd[latent])
    tie = np.random.default_rng(seed + latent).permutation(len(cand))
    return [int(j) for j in cand[np.lexsort((tie, dist))[:n]]]


def verdict(value: float, interval: Sequence[float] | None, controls: Sequence[float],
            firing: int, songs: int, rule: Rule) -> str:
    """``used``: the effect exceeds every control's and its interval lies above 0;
    ``insufficient``: too few firing positions, songs with firing or usable controls."""
    finite = [c for c in controls if np.isfinite(c)]
    if firing < rule.min_firing or songs < rule.min_songs or len(finite) < rule.min_controls:
        return INSUFFICIENT
    if not np.isfinite(value) or interval is None:
        return INSUFFICIENT
    return USED if value > max(finite) and interval[0] > 0 else NOT_USED


def field_means(sums: np.ndarray, counts: np.ndarray,
                fields: Sequence[str] = FIELDS) -> dict[str, float | None]:
    """Per-field means ``sum over songs / count`` of (songs, fields) sums, plus ``total``."""
    n = float(counts.sum())
    if n <= 0:
        return {k: None for k in (*fields, "total")}
    mean = sums.sum(0) / n
    return {**{f: float(v) for f, v in zip(fields, mean, strict=True)}, "total": float(mean.sum())}
