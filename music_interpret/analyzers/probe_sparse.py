"""One-vs-rest k-sparse probes: does a handful of units separate one label from the rest?

For every label ``attribute=value`` and every representation (latents, raw dimensions,
input embedding):

1. **Select** on the training side only: the ``k`` units that best separate the value
   from the attribute's other values, by AUROC (``select: auroc``) or by the
   standardised mean difference (``mean_diff``). Latents are ranked one-sided (a latent
   that fires for the value); signed units (raw and embedding dimensions) two-sided,
   since a probe may weight them negatively.
2. **Fit** an L2-regularised logistic regression (the objective of scikit-learn's
   ``LogisticRegression(C)``, standardised inputs) on those ``k`` units, by Newton's
   method batched over the attribute's labels.
3. **Score** on the test songs: AUROC of the probe's score, and F1 at the threshold that
   maximises F1 on the training side; both with song-bootstrap intervals.

The same with the training labels permuted (``shuffled``) gives what selection and fit
find by chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .probe_metrics import auroc_values, best_f1_threshold, f1_values, summarize

SELECT = ("auroc", "mean_diff")
NEWTON_ITERS = 30


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)


def unit_auroc(x: Any, onehot: np.ndarray) -> np.ndarray:
    """(units, labels) AUROC of every unit (column of ``x``, dense or sparse non-negative)
    for every label (boolean column of ``onehot``) against the other rows; ties a half."""
    import scipy.sparse as sp
    from scipy.stats import rankdata

    n = x.shape[0]
    y = np.asarray(onehot, np.float64)
    pos = y.sum(0)
    if sp.issparse(x) and (x.data >= 0).all():
        c = sp.csc_matrix(x, dtype=np.float64)
        c.sum_duplicates()
        counts = np.diff(c.indptr)
        col = np.repeat(np.arange(c.shape[1]), counts)
        order = np.lexsort((c.data, col))
        data, col_s, rows = c.data[order], col[order], c.indices[order]
        zeros = n - counts
        # average rank of each non-zero among its column (after the column's zeros)
        new = np.r_[True, (data[1:] != data[:-1]) | (col_s[1:] != col_s[:-1])]
        group = np.cumsum(new) - 1
        pos_in_col = np.arange(len(data)) - c.indptr[col_s]
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], len(data)] - 1
        middle = (pos_in_col[starts] + pos_in_col[ends]) / 2
        ranks = zeros[col_s] + middle[group] + 1
        r = sp.csr_matrix((ranks, (rows, col_s)), shape=c.shape)
        b = sp.csr_matrix((np.ones_like(ranks), (rows, col_s)), shape=c.shape)
        zero_rank = (zeros + 1) / 2
        sums = np.asarray(r.T @ y) + zero_rank[:, None] * (pos[None, :] - np.asarray(b.T @ y))
    else:
        sums = rankdata(_dense(x), axis=0).T @ y
    neg = n - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums - pos * (pos + 1) / 2) / (pos * neg)


def unit_mean_diff(x: Any, onehot: np.ndarray) -> np.ndarray:
    """(units, labels) (mean on the label - mean elsewhere) / the unit's std (signed)."""
    y = np.asarray(onehot, np.float64)
    pos = y.sum(0)
    n = x.shape[0]
    total = np.asarray(x.sum(0)).reshape(-1)
    on = np.asarray(x.T @ y)
    sq = np.asarray((x.multiply(x) if hasattr(x, "multiply") else x * x).sum(0)).reshape(-1)
    std = np.sqrt(np.maximum(sq / n - (total / n) ** 2, 0)) + 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = on / pos - (total[:, None] - on) / (n - pos)
    return diff / std[:, None]


def select_units(x: Any, onehot: np.ndarray, k: int, how: str, two_sided: bool) -> np.ndarray:
    """(labels, k) indices of the best-separating units per label, best first."""
    if how == "auroc":
        score = unit_auroc(x, onehot)
        score = np.maximum(score, 1 - score) if two_sided else score
    else:
        score = unit_mean_diff(x, onehot)
        score = np.abs(score) if two_sided else score
    score = np.nan_to_num(score, nan=-np.inf)
    return np.argsort(-score, axis=0, kind="stable")[: min(k, score.shape[0])].T


def fit_logistic(x: Any, y: Any, C: float, iters: int = NEWTON_ITERS) -> tuple[Any, Any, Any]:
    """Batched L2 logistic regression: ``x`` (L, n, k), ``y`` (L, n) in {0, 1} (torch).

    Minimises ``sum log-loss + |w|^2 / (2 C)`` on standardised inputs (intercept not
    penalised) by Newton steps, halved where a step does not lower the objective (float64
    throughout). Returns (mean, std, weights (L, k + 1)) so that the score of rows ``x'``
    is ``((x' - mean) / std) @ w[:, :k] + w[:, k]``.
    """
    import torch

    x = x.double()
    y = y.double()
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True, unbiased=False).clamp_min(1e-12)
    z = torch.cat([(x - mean) / std, torch.ones_like(x[..., :1])], -1)
    n_l, _, d = z.shape
    reg = torch.full((d,), 1.0 / C, dtype=z.dtype)
    reg[-1] = 1e-10
    w = torch.zeros(n_l, d, dtype=z.dtype)

    def objective(w: Any) -> tuple[Any, Any]:
        s = torch.bmm(z, w.unsqueeze(-1)).squeeze(-1)
        return (torch.nn.functional.softplus(s) - y * s).sum(1) + 0.5 * (reg * w * w).sum(1), s

    value, s = objective(w)
    for _ in range(iters):
        p = torch.sigmoid(s)
        grad = torch.bmm(z.transpose(1, 2), (p - y).unsqueeze(-1)).squeeze(-1) + reg * w
        hess = torch.bmm(z.transpose(1, 2) * (p * (1 - p)).unsqueeze(1), z) + torch.diag(reg)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(n_l, 1, dtype=z.dtype)
        new, s_new = objective(w - step)
        for _ in range(20):  # halve the step where it does not lower the objective
            worse = new > value + 1e-12 * (1 + value.abs())
            if not bool(worse.any()):
                break
            t = torch.where(worse[:, None], t / 2, t)
            new, s_new = objective(w - t * step)
        gain = value - new
        w, value, s = w - t * step, new, s_new
        if bool((gain.abs() <= 1e-8 * (1 + value.abs())).all()):
            break
    return mean, std, w


def _scores(x: Any, mean: Any, std: Any, w: Any) -> Any:
    import torch

    z = (x.double() - mean) / std
    return torch.bmm(z, w[:, :-1].unsqueeze(-1)).squeeze(-1) + w[:, -1:]


def sparse_probe_scores(x_tr: Any, y_tr: np.ndarray, x_te: Any, selected: np.ndarray,
                        ks: Sequence[int], C: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{k: (train scores (L, n_tr), test scores (L, n_te))} of the probes on the first ``k``
    of each label's ``selected`` units; ``y_tr`` (n_tr, L) boolean."""
    import torch

    cols = np.unique(selected)
    pos = np.searchsorted(cols, selected)
    dense_tr = torch.from_numpy(_dense(x_tr[:, cols]))
    dense_te = torch.from_numpy(_dense(x_te[:, cols]))
    y = torch.from_numpy(np.asarray(y_tr, np.float64).T)
    out = {}
    for k in ks:
        k_used = min(k, pos.shape[1])
        idx = torch.from_numpy(pos[:, :k_used])
        xtr = dense_tr[:, idx].permute(1, 0, 2)  # (L, n, k)
        xte = dense_te[:, idx].permute(1, 0, 2)
        mean, std, w = fit_logistic(xtr, y, C)
        out[k] = (_scores(xtr, mean, std, w).numpy(), _scores(xte, mean, std, w).numpy())
    return out


def label_metrics(runs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], y_te: np.ndarray,
                  idx: np.ndarray, n_songs: int, weights: np.ndarray) -> np.ndarray:
    """(metric [auroc, f1], stat) of one label's probe on the test side. ``runs``: one or
    more (train scores, train labels, test scores), e.g. one per label permutation: the
    value is their mean, the interval the 95% range of their pooled bootstrap replicates."""
    values: list[list[float]] = [[], []]
    boots: list[list[np.ndarray]] = [[], []]
    for train_score, y_tr, test_score in runs:
        threshold = best_f1_threshold(train_score, y_tr)
        for m, (v, b) in enumerate((auroc_values(test_score, y_te, idx, n_songs, weights),
                                    f1_values(test_score >= threshold, y_te, idx, n_songs,
                                              weights))):
            values[m].append(v)
            boots[m].append(b)
    return np.stack([summarize(values[m], boots[m]) for m in range(2)])
