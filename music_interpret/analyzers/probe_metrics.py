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
    pos_score, pos_song = score[y], idx[y]
    neg_score, neg_song = score[~y], idx[~y]
    order = np.lexsort((neg_score, neg_song))
    neg_score, neg_song = neg_score[order], neg_song[order]
    bounds = np.searchsorted(neg_song, np.arange(n_songs + 1))
    below = np.zeros((len(pos_score), n_songs))
    for t in np.flatnonzero(np.diff(bounds)):
        seg = neg_score[bounds[t]: bounds[t + 1]]
        lo = np.searchsorted(seg, pos_score, "left")
        below[:, t] = lo + 0.5 * (np.searchsorted(seg, pos_score, "right") - lo)
    m = np.zeros((n_songs, n_songs))
    np.add.at(m, pos_song, below)
    return (m, np.bincount(pos_song, minlength=n_songs).astype(np.float64),
            np.bincount(neg_song, minlength=n_songs).astype(np.float64))


def auroc_values(score: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
                 weights: np.ndarray) -> tuple[float, np.ndarray]:
    """(AUROC of ``score`` for ``y``, its bootstrap replicates); ``idx``: song of each token
    (0..n_songs-1), ``weights``: bootstrap song weights (:func:`bootstrap_weights`)."""
    m, p, n = auroc_pairs(score, y, idx, n_songs)
    if p.sum() == 0 or n.sum() == 0:
        return np.nan, np.full(len(weights), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.einsum("bs,st,bt->b", weights, m, weights) / ((weights @ p) * (weights @ n))
    return float(m.sum() / (p.sum() * n.sum())), boot


def f1_values(pred: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
              weights: np.ndarray) -> tuple[float, np.ndarray]:
    """(F1 of boolean predictions ``pred`` for ``y``, its bootstrap replicates)."""
    pred = np.asarray(pred, bool)
    y = np.asarray(y, bool)
    counts = np.zeros((n_songs, 3))  # tp, fp, fn
    for j, hit in enumerate((pred & y, pred & ~y, ~pred & y)):
        np.add.at(counts[:, j], idx[hit], 1)

    def f1(c: np.ndarray) -> np.ndarray:
        denom = 2 * c[..., 0] + c[..., 1] + c[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * c[..., 0] / denom, np.nan)

    return float(f1(counts.sum(0))), f1(weights @ counts)


def summarize(values: list[float], replicates: list[np.ndarray]) -> np.ndarray:
    """(value, ci_low, ci_high): the mean of ``values`` and the 95% range of the pooled
    bootstrap replicates (one value: its own bootstrap interval)."""
    out = np.full(len(STATS), np.nan)
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        out[0] = float(np.mean(finite))
    pooled = np.concatenate(replicates) if replicates else np.zeros(0)
    if len(pooled):
        out[1:] = _ci(pooled)
    return out


def auroc_with_ci(score: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
                  weights: np.ndarray) -> np.ndarray:
    """(value, ci_low, ci_high) of the AUROC of ``score`` for ``y`` (see :func:`auroc_values`)."""
    value, boot = auroc_values(score, y, idx, n_songs, weights)
    return summarize([value], [boot])


def f1_with_ci(pred: np.ndarray, y: np.ndarray, idx: np.ndarray, n_songs: int,
               weights: np.ndarray) -> np.ndarray:
    """(value, ci_low, ci_high) of the F1 of boolean predictions ``pred`` for ``y``."""
    value, boot = f1_values(pred, y, idx, n_songs, weights)
    return summarize([value], [boot])


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
