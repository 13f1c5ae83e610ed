"""Statistics of the transposition test: how latents respond when every pitch moves by k.

Given the codes of the same tokens before (``a``) and after transposing the song by
``k`` semitones (``b``), rows aligned token by token:

* **invariance** of latent i at shift k: the Pearson correlation of ``a[:, i]`` with
  ``b[:, i]`` (1: the latent ignores the key);
* **partner** of latent i at shift k: the latent j != i whose ``b[:, j]`` correlates best
  with ``a[:, i]`` (where i fired on the original, j fires on the transposed input), and
  that correlation; the partner **matches** when j's best pitch label is i's shifted by
  k (the same MIDI pitch + k, or for k not a multiple of 12 the pitch class + k);
* a latent's scores over the shifts: ``invariance`` (mean correlation with itself) and
  ``equivariance`` (mean partner correlation, counted 0 at shifts whose partner does
  not match).

Classes: ``rare`` (fires on fewer than ``min_fires`` original tokens), ``invariant``
(invariance >= ``invariant_threshold``), ``equivariant`` (else, equivariance >=
``equivariant_threshold``), ``neither``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSES = ("invariant", "equivariant", "neither", "rare")


def _moments(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (dense or scipy sparse), float64."""
    n = x.shape[0]
    mean = np.asarray(x.mean(0), np.float64).reshape(-1)
    sq = x.multiply(x).mean(0) if hasattr(x, "multiply") else (np.asarray(x, np.float64) ** 2).mean(0)
    var = np.maximum(np.asarray(sq, np.float64).reshape(-1) - mean**2, 0) * n / max(n - 1, 1)
    return mean, np.sqrt(var)


def self_correlation(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of every column of ``a`` with the same column of ``b`` (NaN where
    a column is constant)."""
    n = a.shape[0]
    ma, sa = _moments(a)
    mb, sb = _moments(b)
    prod = a.multiply(b).sum(0) if hasattr(a, "multiply") else (np.asarray(a, np.float64)
                                                                 * np.asarray(b, np.float64)).sum(0)
    cov = (np.asarray(prod, np.float64).reshape(-1) - n * ma * mb) / max(n - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((sa > 0) & (sb > 0), cov / (sa * sb), np.nan)


def partners(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """(partner j != i, its correlation) for every latent i: the best-correlated column of
    ``b`` with column i of ``a``; -1 / NaN where no column correlates positively.

    Sparse non-negative codes: only pairs that fire together on some token can correlate
    positively, so the search runs over the non-zeros of ``a.T @ b``. Dense: all pairs.
    """
    import scipy.sparse as sp

    n, d = a.shape
    ma, sa = _moments(a)
    mb, sb = _moments(b)
    best = np.full(d, np.nan)
    where = np.full(d, -1, np.int64)
    if sp.issparse(a):
        s = (sp.csr_matrix(a, dtype=np.float64).T @ sp.csr_matrix(b, dtype=np.float64)).tocoo()
        keep = s.row != s.col
        i, j, v = s.row[keep], s.col[keep], s.data[keep]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = (v - n * ma[i] * mb[j]) / (max(n - 1, 1) * sa[i] * sb[j])
        ok = np.isfinite(corr) & (corr > 0)
        i, j, corr = i[ok], j[ok], corr[ok]
        if not len(i):
            return where, best
        order = np.lexsort((-corr, i))
        first = np.r_[True, i[order][1:] != i[order][:-1]]
        rows = order[first]
        best[i[rows]], where[i[rows]] = corr[rows], j[rows]
        return where, best
    za = (np.asarray(a, np.float64) - ma) / np.where(sa > 0, sa, np.inf)
    zb = (np.asarray(b, np.float64) - mb) / np.where(sb > 0, sb, np.inf)
    corr = za.T @ zb / max(n - 1, 1)
    np.fill_diagonal(corr, -np.inf)
    j = corr.argmax(1)
    c = corr[np.arange(d), j]
    ok = c > 0
    where[ok], best[ok] = j[ok], c[ok]
    return where, best


def best_pitch(a: Any, pitch: np.ndarray, min_count: int = 5) -> np.ndarray:
    """Per latent: the MIDI pitch (among those of at least ``min_count`` tokens) on whose
    tokens its mean activation is highest; -1 where it never fires on one."""
    import scipy.sparse as sp

    pitch = np.asarray(pitch)
    ok = pitch >= 0
    values, inverse, counts = np.unique(pitch[ok], return_inverse=True, return_counts=True)
    onehot = sp.csr_matrix((np.ones(int(ok.sum())), (inverse, np.flatnonzero(ok))),
                           shape=(len(values), len(pitch)))
    sums = np.asarray((onehot @ a).todense() if sp.issparse(a) else onehot @ np.asarray(a))
    means = sums / counts[:, None]
    means[counts < min_count] = -np.inf
    out = values[means.argmax(0)] if len(values) else np.full(a.shape[1], -1)
    fired = means.max(0) > 0 if len(values) else np.zeros(a.shape[1], bool)
    return np.where(fired, out, -1).astype(np.int64)


def label_match(best: np.ndarray, partner: np.ndarray, shift: int) -> np.ndarray:
    """Whether each latent's partner has its best pitch shifted by ``shift`` (see module doc)."""
    bi = best
    bj = np.where(partner >= 0, best[np.maximum(partner, 0)], -1)
    ok = (bi >= 0) & (bj >= 0) & (partner >= 0)
    same_pitch = bj - bi == shift
    same_class = ((bj - bi - shift) % 12 == 0) & (shift % 12 != 0)
    return ok & (same_pitch | same_class)


@dataclass
class ShiftStats:
    """Per latent at one shift: invariance, partner, partner correlation, label match."""

    shift: int
    invariance: np.ndarray
    partner: np.ndarray
    partner_corr: np.ndarray
    match: np.ndarray


def shift_stats(a: Any, b: Any, best: np.ndarray, shift: int) -> ShiftStats:
    """The statistics of one shift (``a``, ``b``: codes of the same tokens, before / after)."""
    partner, corr = partners(a, b)
    return ShiftStats(shift, self_correlation(a, b), partner, corr, label_match(best, partner, shift))


@dataclass
class Classified:
    """Per latent scores and classes over every shift."""

    invariance: np.ndarray
    equivariance: np.ndarray
    fires: np.ndarray
    label: np.ndarray  # index into CLASSES

    def counts(self) -> dict[str, int]:
        return {c: int((self.label == i).sum()) for i, c in enumerate(CLASSES)}


def equivariance_score(stats: Sequence[ShiftStats], match: Sequence[np.ndarray] | None = None
                       ) -> np.ndarray:
    """Mean over shifts of the partner correlation where the partner matches (else 0)."""
    match = match if match is not None else [s.match for s in stats]
    return np.mean([np.where(m, np.nan_to_num(s.partner_corr), 0.0)
                    for s, m in zip(stats, match, strict=True)], axis=0)


def classify(stats: Sequence[ShiftStats], fires: np.ndarray, min_fires: int,
             invariant_threshold: float, equivariant_threshold: float,
             match: Sequence[np.ndarray] | None = None) -> Classified:
    """Scores and classes of every latent (see the module doc)."""
    with warnings.catch_warnings():  # latents that never fire: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        inv = np.nanmean(np.stack([s.invariance for s in stats]), axis=0)
    eq = equivariance_score(stats, match)
    label = np.full(len(fires), CLASSES.index("neither"))
    label[np.nan_to_num(eq) >= equivariant_threshold] = CLASSES.index("equivariant")
    label[np.nan_to_num(inv) >= invariant_threshold] = CLASSES.index("invariant")
    label[fires < min_fires] = CLASSES.index("rare")
    return Classified(inv, eq, fires, label)


def shuffled_label_counts(stats: Sequence[ShiftStats], best: np.ndarray, fires: np.ndarray,
                          min_fires: int, invariant_threshold: float, equivariant_threshold: float,
                          n_perm: int, seed: int) -> dict[str, float]:
    """Mean class counts with the best-pitch labels permuted among the latents that have one:
    how many latents look equivariant when partners' labels match by chance."""
    rng = np.random.default_rng(seed)
    have = np.flatnonzero(best >= 0)
    totals = np.zeros(len(CLASSES))
    for _ in range(n_perm):
        perm = best.copy()
        perm[have] = rng.permutation(best[have])
        match = [label_match(perm, s.partner, s.shift) for s in stats]
        c = classify(stats, fires, min_fires, invariant_threshold, equivariant_threshold, match)
        totals += [c.counts()[k] for k in CLASSES]
    return {k: float(v / max(n_perm, 1)) for k, v in zip(CLASSES, totals, strict=True)}
