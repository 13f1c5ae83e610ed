"""Probe scores with 95% bootstrap intervals that resample test *songs*.

Tokens of one song are not independent, so every interval comes from resampling the test
songs with replacement (``n_boot`` times) and recomputing the score from per-song
sufficient statistics: confusion matrices (accuracy, macro-F1), true/false positive and
false negative counts (F1), and for AUROC the song-by-song matrix ``M[s, t]`` of
(positive of song s, negative of song t) pairs ranked correctly (ties count a half), so
that a resample with song weights ``w`` has AUROC ``w M w / ((w P)(w N))``.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "macro_f1")
OVR_METRICS = ("auroc", "f1")
STATS = ("value", "ci_low", "ci_high")


def song_index(songs: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each token's song among the distinct songs, number of distinct songs)."""
    uniq, idx = np.unique(np.asarray(songs), return_inverse=True)
    return idx.reshape(-1), len(uniq)


def bootstrap_weights(n_songs: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_songs) multinomial counts: how often each song is drawn per resample."""
    if n_boot <= 0 or n_songs < 2:
        return np.zeros((0, n_songs))
    return rng.multinomial(n_songs, np.full(n_songs, 1 / n_songs), size=n_boot).astype(np.float64)


def _ci(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return np.nan, np.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


# -- multiclass ---------------------------------------------------------------------------


def macro_f1_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices (..., C, C) (rows: true, columns: predicted)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    denom = conf.sum(-1) + conf.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    if not f1.shape[-1]:
        return np.full(f1.shape[:-1], np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean(f1, axis=-1)


def scores_with_ci(y: np.ndarray, pred: np.ndarray, songs: np.ndarray, n_classes: int,
                   n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(metric, stat) array: accuracy and macro-F1 with song-bootstrap 95% intervals."""
    idx, n_songs = song_index(songs)
    per_song = np.zeros((n_songs, n_classes * n_classes))
    np.add.at(per_song, (idx, y * n_classes + pred), 1)
    per_song = per_song.reshape(n_songs, n_classes, n_classes)
    conf = per_song.sum(0)
    out = np.full((len(METRICS), len(STATS)), np.nan)
    out[0, 0] = np.trace(conf) / max(conf.sum(), 1)
    out[1, 0] = macro_f1_from_confusion(conf)
    weights = bootstrap_weights(n_songs, n_boot, rng)
    if len(weights):
        boot = np.einsum("bs,sij->bij", weights, per_song)
        acc = np.trace(boot, axis1=1, axis2=2) / np.maximum(boot.sum((1, 2)), 1)
        for m, values in enumerate((acc, macro_f1_from_confusion(boot))):
            out[m, 1:] = _ci(values)
    return out


# -- one label against the rest -------------------------------------------------------------


def auroc_pairs(score: np.ndarray, y: np.ndarray, idx: np.ndarray,
                n_songs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, P, N): ``M[s, t]`` correctly ranked (positive of song s, negative of song t)
    pairs, ties a half; ``P``/``N`` positives / negatives per song."""
    score = np.asarray(score, np.float64)
    y = np.asarray(y, bool)
    _, group = np.unique(score, return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0
    pos = np.zeros((n_groups, n_songs))
    neg = np.zeros((n_groups, n_songs))
    np.add.at(pos, (group[y], idx[y]), 1)
    np.add.at(neg, (group[~y], idx[~y]), 1)
    below = np.cumsum(neg, axis=0) - neg  # negatives with a lower score, per song
    return pos.T @ (below + 0.5 * neg), pos.sum(0), neg.sum(0)


def auroc_with_ci(score: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
                  weights: np.ndarray) -> np.ndarray:
    """(value, ci_low, ci_high) of the AUROC of ``score`` for ``y``; ``idx``: song of each token
    (0..n_songs-1), ``weights``: bootstrap song weights (:func:`bootstrap_weights`)."""
    m, p, n = auroc_pairs(score, y, idx, n_songs)
    out = np.full(len(STATS), np.nan)
    if p.sum() == 0 or n.sum() == 0:
        return out
    out[0] = m.sum() / (p.sum() * n.sum())
    if len(weights):
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.einsum("bs,st,bt->b", weights, m, weights) / ((weights @ p) * (weights @ n))
        out[1:] = _ci(values)
    return out


def f1_with_ci(pred: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
               weights: np.ndarray) -> np.ndarray:
    """(value, ci_low, ci_high) of the F1 of boolean predictions ``pred`` for ``y``."""
    pred = np.asarray(pred, bool)
    y = np.asarray(y, bool)
    counts = np.zeros((n_songs, 3))  # tp, fp, fn
    for j, hit in enumerate((pred & y, pred & ~y, ~pred & y)):
        np.add.at(counts[:, j], idx[hit], 1)

    def f1(c: np.ndarray) -> np.ndarray:
        denom = 2 * c[..., 0] + c[..., 1] + c[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * c[..., 0] / denom, np.nan)

    out = np.full(len(STATS), np.nan)
    out[0] = f1(counts.sum(0))
    if len(weights):
        out[1:] = _ci(f1(weights @ counts))
    return out


def best_f1_threshold(score: np.ndarray, y: np.ndarray) -> float:
    """The threshold ``t`` (predict ``score >= t``) with the best F1 on (training) data."""
    score = np.asarray(score, np.float64)
    y = np.asarray(y, bool)
    if not y.any():
        return np.inf
    order = np.argsort(-score, kind="stable")
    s, hits = score[order], y[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold can only sit between distinct scores
    f1 = np.where(last, 2 * tp / (tp + fp + y.sum()), -1.0)
    return float(s[int(np.argmax(f1))])
