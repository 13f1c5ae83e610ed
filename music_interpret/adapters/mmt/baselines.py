"""Count baselines for MMT's next-token losses: per-field unigram and bigram models.

Both are scored exactly like the model (:func:`model.field_losses`): every song is
encoded as MMT's dataset encodes it without augmentation (``codes`` (T, 6)); the
targets are ``codes[1:]`` (T - 1 per song, no padding), and the loss of a field is the
mean negative log-probability of its target codes, in nats, over all validation targets.
``total`` is the sum of the six fields. Field ``f`` has ``V_f = n_tokens[f]`` codes
(beat: ``max_beat + 1``).

* **unigram**: ``P(x[t+1, f] = b) = (C_f(b) + a) / (N_f + a V_f)``, where ``C_f(b)`` counts
  target code ``b`` of field ``f`` over the training songs' targets, ``N_f`` is their
  number and ``a`` the additive smoothing (1: add-one).
* **bigram**: ``P(x[t+1, f] = b | x[t, f] = c) = (C_f(c, b) + a) / (C_f(c) + a V_f)``, where
  ``C_f(c, b)`` counts consecutive pairs (code ``c`` at position t, code ``b`` at t + 1)
  inside each training song, for t = 0..T-2, and ``C_f(c) = sum_b C_f(c, b)``. A field is
  conditioned on its own previous code only (not on the other fields).
* **tuned bigram**: the bigram with ``a`` chosen per field from :data:`ALPHA_GRID` by
  5-fold cross-validation over the *training* songs (song ``i`` is in fold ``i % 5``;
  the cross-entropy of all five held-out folds together is minimised). The validation
  split is not used to choose ``a``.

Only numpy is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
ALPHA_GRID = tuple(float(a) for a in np.logspace(-6, 1, 29))  # 4 per decade
FOLDS = 5


def _as_alphas(alpha: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(alpha, Mapping):
        return {name: float(alpha[name]) for name in FIELDS}
    return dict.fromkeys(FIELDS, float(alpha))


def _with_total(out: dict[str, float]) -> dict[str, float]:
    out["total"] = float(sum(out[name] for name in FIELDS))
    return out


def _pairs(songs: Sequence[np.ndarray], f: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous code, target code) of field ``f`` over every target of ``songs``."""
    if not songs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    prev = np.concatenate([c[:-1, f] for c in songs]).astype(np.int64)
    nxt = np.concatenate([c[1:, f] for c in songs]).astype(np.int64)
    return prev, nxt


def unigram_baseline(
    train: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    n_tokens: Sequence[int],
    alpha: float | Mapping[str, float] = 1.0,
) -> dict[str, float]:
    """Validation cross-entropy (nats per target) of each field's smoothed code frequencies."""
    alphas = _as_alphas(alpha)
    out = {}
    for f, name in enumerate(FIELDS):
        counts = np.bincount(_pairs(train, f)[1], minlength=n_tokens[f]).astype(np.float64)
        logp = np.log((counts + alphas[name]) / (counts.sum() + alphas[name] * n_tokens[f]))
        out[name] = float(-logp[_pairs(valid, f)[1]].mean())
    return _with_total(out)


def bigram_counts(songs: Sequence[np.ndarray], f: int, vocab: int) -> np.ndarray:
    """``C_f(c, b)``: (vocab, vocab) counts of consecutive codes of field ``f``."""
    prev, nxt = _pairs(songs, f)
    return np.bincount(prev * vocab + nxt, minlength=vocab * vocab).reshape(vocab, vocab)


def _bigram_nll(counts: np.ndarray, alpha: float, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Negative log-probabilities of the targets ``nxt`` after ``prev``."""
    vocab = counts.shape[0]
    num = counts[prev, nxt] + alpha
    den = counts.sum(axis=1)[prev] + alpha * vocab
    return -np.log(num / den)


def bigram_baseline(
    train: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    n_tokens: Sequence[int],
    alpha: float | Mapping[str, float] = 1.0,
) -> dict[str, float]:
    """Validation cross-entropy of each field given the same field's previous code."""
    alphas = _as_alphas(alpha)
    out = {}
    for f, name in enumerate(FIELDS):
        counts = bigram_counts(train, f, n_tokens[f]).astype(np.float64)
        out[name] = float(_bigram_nll(counts, alphas[name], *_pairs(valid, f)).mean())
    return _with_total(out)


def tune_bigram_alpha(
    train: Sequence[np.ndarray],
    n_tokens: Sequence[int],
    grid: Sequence[float] = ALPHA_GRID,
    folds: int = FOLDS,
) -> dict[str, float]:
    """Per-field additive smoothing chosen by ``folds``-fold cross-validation on ``train``."""
    folds = max(2, min(folds, len(train)))
    split = [[s for i, s in enumerate(train) if i % folds == k] for k in range(folds)]
    best = {}
    for f, name in enumerate(FIELDS):
        vocab = n_tokens[f]
        fold_counts = [bigram_counts(part, f, vocab).astype(np.float64) for part in split]
        total = np.sum(fold_counts, axis=0)
        held = [_pairs(part, f) for part in split]
        scores = []
        for a in grid:
            nll = sum(float(_bigram_nll(total - fold_counts[k], a, *held[k]).sum())
                      for k in range(folds))  # fmt: skip
            scores.append(nll)
        best[name] = float(grid[int(np.argmin(scores))])
    return best


def baselines(
    train: Sequence[np.ndarray], valid: Sequence[np.ndarray], n_tokens: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Unigram (add-one), bigram (add-one) and tuned bigram baselines, with the tuned alphas."""
    alphas = tune_bigram_alpha(train, n_tokens)
    return {
        "unigram": unigram_baseline(train, valid, n_tokens),
        "bigram": bigram_baseline(train, valid, n_tokens),
        "bigram_tuned": bigram_baseline(train, valid, n_tokens, alphas),
        "bigram_tuned_alpha": alphas,
    }
