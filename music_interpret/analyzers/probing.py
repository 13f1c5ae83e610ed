"""``probe``: linear probes for musical attributes on raw activations, latents and k-sparse latents.

Per hook point and attribute (see :mod:`.attributes`), a multinomial logistic regression
(scikit-learn, standardised inputs; ``class_weight: balanced`` optional) is trained on

* ``raw``: the hook point's activations;
* ``latents``: all dictionary latents (sparse, scaled to unit variance);
* ``k1``, ``k4``, ``k16`` (``ks``): the k latents with the highest ANOVA F score for the
  attribute on the training split (a univariate filter);

against two baselines: ``majority`` (the most frequent training class) and ``shuffled``
(the raw probe trained on permuted training labels: chance given the class balance).

Tokens: ``max_tokens`` tokens drawn at random (seeded) from the whole store; the
split is by song (:func:`~music_interpret.learners.holdout.holdout_songs` with
``test_fraction``), so no song is on both sides. Classes with fewer than
``min_class_count`` training tokens are left out (their tokens too). Accuracy and macro-F1
come with 95% bootstrap intervals that resample test *songs* (tokens of a song are not
independent), computed from per-song confusion matrices.

Outputs: ``probe.nc`` (variable ``score`` with dims hook, attribute, representation,
metric, stat), ``probe.csv`` (one row per hook, attribute, representation, metric) and
``probe.png`` (accuracy across hook points per attribute).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer
from .attributes import ATTRIBUTES, BEAT_NOTE, iter_store_attributes, resolve_attributes

DEFAULT_ATTRIBUTES = ["pitch_class", "octave", "position", "beat_mod4", "duration",
                      "instrument", "event_type"]
METRICS = ("accuracy", "macro_f1")
STATS = ("value", "ci_low", "ci_high")
ENCODE_BATCH = 4096
SHUFFLED_MAX_ITER = 30


@dataclass
class ProbeConfig:
    """Options of ``probe``."""

    attributes: list[str] = field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    max_tokens: int = 20_000
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    test_fraction: float = 0.2
    bootstrap: int = 200
    C: float = 1.0
    max_iter: int = 100
    class_weight: str = "none"  # or "balanced" (hurts accuracy on skewed attributes)
    min_class_count: int = 10

    def __post_init__(self) -> None:
        resolve_attributes(self.attributes, "probe.attributes")
        if self.max_tokens < 10 or self.bootstrap < 0 or self.max_iter < 1 or self.C <= 0:
            raise ValueError("max_tokens >= 10, bootstrap >= 0, max_iter >= 1 and C > 0 required")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must be distinct positive integers, got {self.ks}")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.min_class_count < 1:
            raise ValueError(f"min_class_count must be positive, got {self.min_class_count}")

    @property
    def representations(self) -> list[str]:
        return ["raw", "latents", *(f"k{k}" for k in self.ks), "majority", "shuffled"]


# -- data -------------------------------------------------------------------------------


@dataclass
class Sample:
    """Sampled tokens: global indices, songs and attribute codes."""

    index: np.ndarray
    song: np.ndarray
    codes: dict[str, np.ndarray]


def sample_tokens(info: Any, attributes: list[str], n: int, seed: int) -> Sample:
    """``n`` tokens drawn without replacement (seeded) from the whole store, in store order."""
    from ..stores.netcdf import read_coords

    total = info.n_tokens
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    songs, codes, offset = [], {a: [] for a in attributes}, 0
    for shard, used, shard_codes in iter_store_attributes(info, attributes):
        rows = pick[(pick >= offset) & (pick < offset + used)] - offset
        songs.append(read_coords(info.shards[shard], ["song"])["song"][rows])
        for a in attributes:
            codes[a].append(shard_codes[a][rows])
        offset += used
    return Sample(pick, np.concatenate(songs).astype(np.int64),
                  {a: np.concatenate(v) for a, v in codes.items()})


def read_rows(info: Any, hook: str, index: np.ndarray, encode: Any = None,
              chunk: int = 16_384) -> tuple[np.ndarray, Any]:
    """Raw activations (n, d_model) of the global token ``index`` (sorted) and, with
    ``encode``, their latents as a scipy CSR matrix; streams over the store."""
    import scipy.sparse as sp
    import torch

    from ..preprocess import reader_for

    raw = np.empty((len(index), info.d_model), np.float32)
    latent_parts = []
    offset = 0
    with reader_for(info, hook) as reader, torch.no_grad():
        for shard, entry in enumerate(info.manifest["shards"]):
            n = int(entry["tokens"])
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                a, b = np.searchsorted(index, [offset + s, offset + e])
                if a == b:
                    continue
                block = reader.read(shard, s, e)
                raw[a:b] = block[index[a:b] - offset - s]
            offset += n
    if encode is not None:
        for s in range(0, len(raw), ENCODE_BATCH):
            with torch.no_grad():
                f = encode(torch.from_numpy(raw[s : s + ENCODE_BATCH])).float().numpy()
            latent_parts.append(sp.csr_matrix(f))
    latents = sp.vstack(latent_parts).tocsr() if latent_parts else None
    return raw, latents


def song_split(info: Any, songs: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for tokens of held-out (test) songs."""
    from ..learners.holdout import holdout_songs

    held = np.zeros(len(info.songs), bool)
    held[holdout_songs(info.songs, fraction, seed)] = True
    return held[songs]


# -- metrics ----------------------------------------------------------------------------


def macro_f1_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices (..., C, C) (rows: true, columns: predicted)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    denom = conf.sum(-1) + conf.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return np.nanmean(f1, axis=-1) if f1.shape[-1] else np.full(f1.shape[:-1], np.nan)


def scores_with_ci(y: np.ndarray, pred: np.ndarray, songs: np.ndarray, n_classes: int,
                   n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(metric, stat) array: accuracy and macro-F1 with song-bootstrap 95% intervals."""
    uniq, song_idx = np.unique(songs, return_inverse=True)
    per_song = np.zeros((len(uniq), n_classes * n_classes))
    np.add.at(per_song, (song_idx, y * n_classes + pred), 1)
    per_song = per_song.reshape(len(uniq), n_classes, n_classes)
    conf = per_song.sum(0)
    out = np.full((len(METRICS), len(STATS)), np.nan)
    out[0, 0] = np.trace(conf) / max(conf.sum(), 1)
    out[1, 0] = macro_f1_from_confusion(conf)
    if n_boot and len(uniq) > 1:
        weights = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=n_boot)
        boot = np.einsum("bs,sij->bij", weights, per_song)
        acc = np.trace(boot, axis1=1, axis2=2) / np.maximum(boot.sum((1, 2)), 1)
        f1 = macro_f1_from_confusion(boot)
        for m, values in enumerate((acc, f1)):
            out[m, 1:] = np.nanpercentile(values, [2.5, 97.5])
    return out


# -- probes -----------------------------------------------------------------------------


def fit_predict(x_train: Any, y_train: np.ndarray, x_test: Any, cfg: ProbeConfig,
                seed: int, max_iter: int | None = None) -> np.ndarray:
    """Standardise (scale only for sparse input), fit the logistic regression, predict."""
    import scipy.sparse as sp
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=not sp.issparse(x_train))
    xt = scaler.fit_transform(x_train)
    model = LogisticRegression(C=cfg.C, max_iter=max_iter or cfg.max_iter, random_state=seed,
                               class_weight=None if cfg.class_weight == "none" else "balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(xt, y_train)
    return model.predict(scaler.transform(x_test))


def top_k_latents(latents_train: Any, y_train: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` latents with the highest ANOVA F score (dead latents last)."""
    from sklearn.feature_selection import f_classif

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        f, _ = f_classif(latents_train, y_train)
    f = np.nan_to_num(f, nan=-1.0, posinf=np.finfo(np.float64).max)
    return np.argsort(-f, kind="stable")[:k]


def probe_attribute(codes: np.ndarray, test: np.ndarray, songs: np.ndarray, raw: np.ndarray,
                    latents: Any, cfg: ProbeConfig, seed: int) -> dict[str, Any] | None:
    """Scores (representation, metric, stat) of one attribute, or None with < 2 classes."""
    valid = codes >= 0
    train_codes = codes[valid & ~test]
    counts = np.bincount(train_codes, minlength=int(codes.max()) + 1 if len(codes) else 1)
    classes = np.flatnonzero(counts >= cfg.min_class_count)
    if len(classes) < 2:
        return None
    remap = np.full(len(counts), -1)
    remap[classes] = np.arange(len(classes))
    y_all = np.where(valid, remap[np.clip(codes, 0, len(counts) - 1)], -1)
    tr = np.flatnonzero((y_all >= 0) & ~test)
    te = np.flatnonzero((y_all >= 0) & test)
    if len(te) == 0:
        return None
    ytr, yte, ste = y_all[tr], y_all[te], songs[te]
    rng = np.random.default_rng(seed)
    n_classes = len(classes)
    preds: dict[str, np.ndarray] = {"raw": fit_predict(raw[tr], ytr, raw[te], cfg, seed)}
    selected = np.array([], np.int64)
    if latents is not None:
        ltr, lte = latents[tr], latents[te]
        preds["latents"] = fit_predict(ltr, ytr, lte, cfg, seed)
        selected = top_k_latents(ltr, ytr, max(cfg.ks))
        for k in cfg.ks:
            cols = selected[:k]
            preds[f"k{k}"] = fit_predict(ltr[:, cols].toarray(), ytr, lte[:, cols].toarray(),
                                         cfg, seed)
    preds["majority"] = np.full(len(te), np.bincount(ytr, minlength=n_classes).argmax())
    # shuffled labels never converge; a few iterations give the same chance-level result
    preds["shuffled"] = fit_predict(raw[tr], rng.permutation(ytr), raw[te], cfg, seed,
                                    max_iter=min(cfg.max_iter, SHUFFLED_MAX_ITER))
    scores = np.full((len(cfg.representations), len(METRICS), len(STATS)), np.nan)
    for i, rep in enumerate(cfg.representations):
        if rep in preds:
            scores[i] = scores_with_ci(yte, preds[rep], ste, n_classes, cfg.bootstrap, rng)
    return {"scores": scores, "n_train": len(tr), "n_test": len(te), "n_classes": n_classes,
            "selected": selected, "test_songs": np.unique(ste), "train_songs": np.unique(songs[tr])}


# -- outputs ----------------------------------------------------------------------------


def write_csv(path: Path, ds: Any) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["hook", "attribute", "representation", "metric", *STATS,
                    "n_train", "n_test", "n_classes"])
        for h in ds.hook.values:
            for a in ds.attribute.values:
                for r in ds.representation.values:
                    for m in ds.metric.values:
                        v = ds.score.sel(hook=h, attribute=a, representation=r, metric=m).values
                        w.writerow([h, a, r, m, *(f"{x:.4f}" if np.isfinite(x) else "" for x in v),
                                    int(ds.n_train.sel(hook=h, attribute=a)),
                                    int(ds.n_test.sel(hook=h, attribute=a)),
                                    int(ds.n_classes.sel(hook=h, attribute=a))])


def plot(path: Path, ds: Any, metric: str = "accuracy") -> None:
    """Accuracy per attribute across hook points: raw vs latents vs k-sparse vs baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(ds.attribute.values)
    cols = min(4, len(attrs))
    rows = -(-len(attrs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False,
                             sharey=True)
    x = np.arange(ds.sizes["hook"])
    for ax, a in zip(axes.flat, attrs, strict=False):
        for r in ds.representation.values:
            v = ds.score.sel(attribute=a, representation=r, metric=metric)
            val, lo, hi = (v.sel(stat=s).values for s in STATS)
            style = "--" if r in ("majority", "shuffled") else "-"
            ax.errorbar(x, val, yerr=[val - lo, hi - val], fmt=style + "o", ms=3, capsize=2,
                        label=str(r))
        ax.set_title(str(a), fontsize=9)
        ax.set_xticks(x, [str(h) for h in ds.hook.values], fontsize=7, rotation=20)
        ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[len(attrs):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"linear probes ({metric}, 95% song-bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ProbeAnalyzer(Analyzer):
    """Linear probes for musical attributes, with a song-level split and baselines."""

    name = "probe"
    description = ("Linear probes (raw activations, all latents, k-sparse latent subsets) for "
                   "musical attributes with a song-level split, baselines and bootstrap CIs.")
    Config = ProbeConfig

    def analyze(self, ctx: Any) -> dict[str, Any]:
        import xarray as xr

        cfg: ProbeConfig = self.config
        info = ctx.store
        n = min(cfg.max_tokens, ctx.max_tokens or cfg.max_tokens, info.n_tokens)
        attributes = resolve_attributes(cfg.attributes, "probe.attributes")
        sample = sample_tokens(info, attributes, n, ctx.seed)
        test = song_split(info, sample.song, cfg.test_fraction, ctx.seed)
        if test.all() or not test.any():
            raise UserError(f"probe: the song split of {info.path} leaves one side empty "
                            f"({len(np.unique(sample.song))} songs sampled; test_fraction "
                            f"{cfg.test_fraction})")
        hooks = list(ctx.dictionaries)
        shape = (len(hooks), len(attributes))
        score = np.full((*shape, len(cfg.representations), len(METRICS), len(STATS)), np.nan)
        n_train, n_test, n_classes = (np.zeros(shape, np.int64) for _ in range(3))
        selected = np.full((*shape, max(cfg.ks)), -1, np.int64)
        bar = ctx.progress(total=len(hooks) * len(attributes), desc="probe")
        for h, hook in enumerate(hooks):
            dictionary = ctx.load_dictionary(hook)
            raw, latents = read_rows(info, hook, sample.index, dictionary.encode_host)
            for a, attr in enumerate(attributes):
                res = probe_attribute(sample.codes[attr], test, sample.song, raw, latents,
                                      cfg, ctx.seed)
                if res is not None:
                    score[h, a] = res["scores"]
                    n_train[h, a], n_test[h, a] = res["n_train"], res["n_test"]
                    n_classes[h, a] = res["n_classes"]
                    selected[h, a, : len(res["selected"])] = res["selected"]
                bar.update(1)
        bar.close()
        ds = xr.Dataset(
            {"score": (("hook", "attribute", "representation", "metric", "stat"), score),
             "n_train": (("hook", "attribute"), n_train),
             "n_test": (("hook", "attribute"), n_test),
             "n_classes": (("hook", "attribute"), n_classes),
             "selected_latents": (("hook", "attribute", "rank"), selected)},
            coords={"hook": hooks, "attribute": attributes,
                    "representation": cfg.representations, "metric": list(METRICS),
                    "stat": list(STATS), "rank": np.arange(max(cfg.ks))},
            attrs={"store_id": info.manifest.get("store_id", ""), "store": str(info.path),
                   "n_tokens": len(sample.index), "test_fraction": cfg.test_fraction,
                   "test_songs": int(len(np.unique(sample.song[test]))),
                   "train_songs": int(len(np.unique(sample.song[~test]))),
                   "class_weight": cfg.class_weight, "bootstrap": cfg.bootstrap,
                   "split": "by song (holdout_songs hash)", "beat_note": BEAT_NOTE,
                   "attribute_docs": "; ".join(f"{a}: {ATTRIBUTES[a].doc}" for a in attributes)})
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".probe.nc.tmp"
        ds.to_netcdf(tmp)
        tmp.replace(out / "probe.nc")
        write_csv(out / "probe.csv", ds)
        plot(out / "probe.png", ds)
        acc = ds.score.sel(metric="accuracy", stat="value")
        return {"tokens": len(sample.index), "hooks": {
            hook: {attr: {r: _round(acc.sel(hook=hook, attribute=attr, representation=r))
                          for r in ("raw", "latents", f"k{max(cfg.ks)}", "majority")}
                   for attr in attributes} for hook in hooks}}


def _round(v: Any) -> float | None:
    x = float(v)
    return round(x, 4) if np.isfinite(x) else None
