"""Probes of one attribute: multiclass probes and one-vs-rest k-sparse probes per value.

Inputs are named representations of the same tokens: ``embedding`` (the model's input
embedding), ``raw`` (the hook point's activations), ``latents`` (the dictionary's codes,
sparse). Multiclass: a multinomial logistic regression (scikit-learn) per
representation, against ``majority`` (the most frequent training class) and ``shuffled``
(the raw probe on permuted training labels). One-vs-rest (:mod:`.probe_sparse`): per
value, k-sparse probes on each representation for every k, and ``all`` (the multinomial
probe's probability of the value), against ``constant`` (one score for every token:
AUROC 0.5, F1 of calling every token positive) and ``shuffled`` (selection and fit on
permuted training labels: latents for k-sparse, averaged over ``shuffles`` permutations
with the pooled bootstrap range as interval; the raw multinomial probe for ``all``). A
probe fit to permuted labels is a random direction, whose AUROC may fall on either side
of 0.5 for one permutation; the average over several sits near 0.5.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .probe_metrics import (
    METRICS,
    OVR_METRICS,
    STATS,
    auroc_with_ci,
    bootstrap_weights,
    f1_with_ci,
    scores_with_ci,
    song_index,
)
from .probe_sparse import label_metrics, select_units, sparse_probe_scores

UNIT_REPS = ("embedding", "raw", "latents")
MC_REPS = (*UNIT_REPS, "majority", "shuffled")
OVR_REPS = (*UNIT_REPS, "constant", "shuffled")
SHUFFLED_MAX_ITER = 30


@dataclass
class ProbeSettings:
    """What :func:`probe_attribute` needs of the analyzer's config."""

    ks: list[int]
    C: float = 1.0
    max_iter: int = 100
    class_weight: str = "none"
    min_class_count: int = 10
    bootstrap: int = 200
    select: str = "auroc"
    shuffles: int = 3

    @property
    def k_labels(self) -> list[str]:
        return [*(str(k) for k in self.ks), "all"]


@dataclass
class AttributeResult:
    """Scores of one attribute: ``multiclass`` (MC_REPS, metric, stat); per kept class
    (``classes``: attribute codes) ``ovr`` (class, OVR_REPS, k, metric, stat) and the
    ``selected`` units (class, UNIT_REPS, max k; -1 none)."""

    classes: np.ndarray
    multiclass: np.ndarray
    ovr: np.ndarray
    selected: np.ndarray
    n_pos_train: np.ndarray
    n_pos_test: np.ndarray
    n_train: int
    n_test: int
    train_songs: np.ndarray
    test_songs: np.ndarray


def fit_multinomial(x_train: Any, y_train: np.ndarray, x_test: Any, s: ProbeSettings, seed: int,
                    max_iter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (train, test) of a standardised logistic regression (scale only
    for sparse input)."""
    import scipy.sparse as sp
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=not sp.issparse(x_train))
    xt = scaler.fit_transform(x_train)
    model = LogisticRegression(C=s.C, max_iter=max_iter or s.max_iter, random_state=seed,
                               class_weight=None if s.class_weight == "none" else "balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(xt, y_train)
    n_classes = int(y_train.max()) + 1
    full_tr = np.zeros((xt.shape[0], n_classes))
    full_te = np.zeros((x_test.shape[0], n_classes))
    full_tr[:, model.classes_] = model.predict_proba(xt)
    full_te[:, model.classes_] = model.predict_proba(scaler.transform(x_test))
    return full_tr, full_te


def kept_classes(codes: np.ndarray, test: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(class of every token, -1 where n/a or rare; the kept attribute codes): values with
    at least ``min_count`` training tokens."""
    valid = codes >= 0
    size = int(codes.max()) + 1 if len(codes) and codes.max() >= 0 else 1
    counts = np.bincount(codes[valid & ~test], minlength=size)
    classes = np.flatnonzero(counts >= min_count)
    remap = np.full(size, -1)
    remap[classes] = np.arange(len(classes))
    return np.where(valid, remap[np.clip(codes, 0, size - 1)], -1), classes


def probe_attribute(codes: np.ndarray, test: np.ndarray, songs: np.ndarray,
                    inputs: dict[str, Any], s: ProbeSettings, seed: int) -> AttributeResult | None:
    """All probes of one attribute (codes -1 = n/a); None with fewer than two classes or no
    test token. ``inputs``: representation name -> (tokens, units) matrix (see module doc)."""
    y_all, classes = kept_classes(codes, test, s.min_class_count)
    tr = np.flatnonzero((y_all >= 0) & ~test)
    te = np.flatnonzero((y_all >= 0) & test)
    if len(classes) < 2 or len(te) == 0:
        return None
    ytr, yte, n_classes = y_all[tr], y_all[te], len(classes)
    rng = np.random.default_rng(seed)
    idx, n_songs = song_index(songs[te])
    weights = bootstrap_weights(n_songs, s.bootstrap, rng)
    oh_tr = ytr[:, None] == np.arange(n_classes)[None, :]
    oh_te = yte[:, None] == np.arange(n_classes)[None, :]
    kmax = max(s.ks)
    mc = np.full((len(MC_REPS), len(METRICS), len(STATS)), np.nan)
    ovr = np.full((n_classes, len(OVR_REPS), len(s.ks) + 1, len(OVR_METRICS), len(STATS)), np.nan)
    selected = np.full((n_classes, len(UNIT_REPS), kmax), -1, np.int64)

    def mc_scores(r: int, proba: np.ndarray) -> None:
        mc[r] = scores_with_ci(yte, proba.argmax(1), songs[te], n_classes, s.bootstrap,
                               np.random.default_rng(seed + 1))

    def ovr_scores(r: int, probes: dict[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
                   ) -> None:
        """``probes[k]``: runs of (train scores (L, n), train one-hot (n, L), test scores)."""
        for j, k in enumerate([*s.ks, "all"]):
            for c in range(n_classes):
                runs = [(p_tr[c], oh[:, c], p_te[c]) for p_tr, oh, p_te in probes.get(k, [])]
                if runs:
                    ovr[c, r, j] = label_metrics(runs, oh_te[:, c], idx, n_songs, weights)

    for r, rep in enumerate(UNIT_REPS):
        x = inputs.get(rep)
        if x is None:
            continue
        x_tr, x_te = x[tr], x[te]
        p_tr, p_te = fit_multinomial(x_tr, ytr, x_te, s, seed)
        mc_scores(MC_REPS.index(rep), p_te)
        sel = select_units(x_tr, oh_tr, kmax, s.select, two_sided=rep != "latents")
        selected[:, r, : sel.shape[1]] = sel
        probes = {k: [(a, oh_tr, b)] for k, (a, b) in
                  sparse_probe_scores(x_tr, oh_tr, x_te, sel, s.ks, s.C).items()}
        probes["all"] = [(p_tr.T, oh_tr, p_te.T)]
        ovr_scores(OVR_REPS.index(rep), probes)
    # baselines
    majority = np.bincount(ytr, minlength=n_classes).argmax()
    mc[MC_REPS.index("majority")] = scores_with_ci(yte, np.full(len(te), majority), songs[te],
                                                   n_classes, s.bootstrap,
                                                   np.random.default_rng(seed + 1))
    r_const = OVR_REPS.index("constant")
    for c in range(n_classes):
        ovr[c, r_const] = np.stack([
            auroc_with_ci(np.zeros(len(te)), oh_te[:, c], idx, n_songs, weights),
            f1_with_ci(np.ones(len(te), bool), oh_te[:, c], idx, n_songs, weights)])[None]
    base = inputs.get("raw")
    if base is not None:  # chance-level probes (see the module doc)
        perms = [rng.permutation(ytr) for _ in range(max(1, s.shuffles))]
        hots = [p[:, None] == np.arange(n_classes)[None, :] for p in perms]
        p_tr, p_te = fit_multinomial(base[tr], perms[0], base[te], s, seed,
                                     max_iter=min(s.max_iter, SHUFFLED_MAX_ITER))
        mc_scores(MC_REPS.index("shuffled"), p_te)
        shuffled: dict[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            "all": [(p_tr.T, hots[0], p_te.T)]}
        units = inputs.get("latents", base)
        for oh_perm in hots:
            sel = select_units(units[tr], oh_perm, kmax, s.select,
                               two_sided="latents" not in inputs)
            for k, (a, b) in sparse_probe_scores(units[tr], oh_perm, units[te], sel, s.ks,
                                                 s.C).items():
                shuffled.setdefault(k, []).append((a, oh_perm, b))
        ovr_scores(OVR_REPS.index("shuffled"), shuffled)
    return AttributeResult(classes, mc, ovr, selected, oh_tr.sum(0), oh_te.sum(0), len(tr),
                           len(te), np.unique(songs[tr]), np.unique(songs[te]))
