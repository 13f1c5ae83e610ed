"""``feature_token``: which musical attribute values each latent (and each raw dimension) codes for.

For every unit u (dictionary latent, and as a baseline every raw dimension of the hook
point) and every label l = ``attribute=value`` (see :mod:`.attributes`):

* ``firing_rate[u, l]``: fraction of the tokens with label l on which the unit is > 0;
* ``mean_activation[u, l]``: its mean activation on those tokens;
* ``auroc[u, l]``: AUROC of the unit's activation for "token has label l" against every
  other token of the selection (tokens where the attribute is n/a included).

Streaming AUROC (memory independent of the token count, no tokens x units matrix):
the Mann-Whitney form AUROC = (sum of the positives' mid-ranks - n+(n+ + 1)/2) / (n+ n-)
needs only one number per (unit, label) -- the sum of the positives' mid-ranks -- once
every unit's distribution is known. Pass 1 therefore builds an exact per-unit histogram
with ``bins`` fixed bins (from a small calibration sample: latents get one bin for exact
zeros, where ties are real ties, and ``bins`` bins linear in sqrt(a / max) above; raw
dimensions ``bins`` linear bins over the sample's range, out-of-range values in the end
bins). Pass 2 maps every activation to its bin's mid-rank and adds, per chunk, one-hot
labels (tokens x labels) @ mid-ranks (tokens x units) -- one matrix product, like the
firing counts and activation sums. The result equals the AUROC of the binned values
exactly (ties inside a bin count 1/2); against the unbinned AUROC the error is at most
1/2 * sum_b pos_b neg_b / (n+ n-) <= 1/2 * (largest count of a bin other than the zero
bin) / max(n+, n-), reported for the best label as ``best_score_error``. The price is
reading and encoding the activations twice.

Per unit: ``best_label`` = the label with the highest AUROC (its ``best_score``), and
``monosemanticity`` = share of the unit's positive activation mass (sum of max(a, 0)
over tokens) that falls on tokens with its best label: 1 when it fires only there.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer
from .attributes import ATTRIBUTES, BEAT_NOTE, iter_store_attributes, resolve_attributes

CALIB_BLOCKS = 16
CALIB_BLOCK_TOKENS = 1024
UNIT_BLOCK = 1024  # units handled at once inside a chunk (bounds the temporaries)
GOOD_SCORE = 0.9
MAX_BINS = 4096


@dataclass
class FeatureTokenConfig:
    """Options of ``feature_token``."""

    attributes: list[str] = field(default_factory=list)  # empty: every known attribute
    max_tokens: int | None = None  # first tokens of the store (also capped by analyze.max_tokens)
    chunk_tokens: int = 4096
    bins: int = 256
    min_count: int = 20  # labels on fewer tokens (or on all but fewer) are left out
    top_n: int = 20  # rows per hook in summary.md

    def __post_init__(self) -> None:
        resolve_attributes(self.attributes, "feature_token.attributes")
        for key in ("chunk_tokens", "bins", "min_count", "top_n"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.bins > MAX_BINS:
            raise ValueError(f"bins must be at most {MAX_BINS}, got {self.bins}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")


# -- labels -----------------------------------------------------------------------------


@dataclass
class LabelSpace:
    """The ``attribute=value`` labels kept for a selection of tokens, and their counts."""

    attributes: list[str]
    attribute: list[str]
    value: list[str]
    codes: list[int]
    counts: np.ndarray  # tokens per label
    n_tokens: int
    index: dict[str, np.ndarray]  # attribute -> code -> label index (-1: not kept)

    @property
    def names(self) -> list[str]:
        return [f"{a}={v}" for a, v in zip(self.attribute, self.value, strict=True)]

    def __len__(self) -> int:
        return len(self.codes)

    def matrix(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """(n, attributes) label index of each token per attribute (-1: no kept label)."""
        cols = []
        for name in self.attributes:
            c = codes[name].astype(np.int64)
            table = self.index[name]
            cols.append(np.where(c >= 0, table[np.maximum(c, 0)], -1))
        return np.stack(cols, axis=1)

    @classmethod
    def scan(cls, info: Any, attributes: Sequence[str], max_tokens: int | None,
             min_count: int) -> LabelSpace:
        """Count every attribute value over the selection (coordinates only) and keep the
        labels on at least ``min_count`` tokens and off at least ``min_count`` tokens."""
        totals = {a: np.zeros(len(ATTRIBUTES[a].labels), np.int64) for a in attributes}
        n = 0
        for _, used, codes in iter_store_attributes(info, attributes, max_tokens):
            n += used
            for a in attributes:
                c = codes[a]
                totals[a] += np.bincount(c[c >= 0], minlength=len(totals[a]))
        attribute, value, kept, counts, index = [], [], [], [], {}
        for a in attributes:
            table = np.full(len(totals[a]), -1, np.int64)
            for code, count in enumerate(totals[a]):
                if count >= min_count and n - count >= min_count:
                    table[code] = len(kept)
                    attribute.append(a)
                    value.append(ATTRIBUTES[a].labels[code])
                    kept.append(code)
                    counts.append(int(count))
            index[a] = table
        return cls(list(attributes), attribute, value, kept, np.asarray(counts, np.int64), n, index)


# -- per-unit accumulators --------------------------------------------------------------


class UnitStats:
    """Streaming label statistics of ``n_units`` units (latents or raw dimensions)."""

    def __init__(self, n_units: int, n_labels: int, bins: int, *, sparse: bool) -> None:
        self.n_units, self.n_labels, self.bins, self.sparse = n_units, n_labels, bins, sparse
        self.n_bins = bins + 1 if sparse else bins  # sparse: bin 0 holds the exact zeros
        self.lo = np.zeros(n_units, np.float32)
        self.hi = np.ones(n_units, np.float32)
        self.hist = np.zeros((n_units, self.n_bins), np.int64)
        self.midrank: Any = None  # torch float64 (units, n_bins) mid-rank / N, after pass 1
        shape = (n_labels, n_units)
        self.fires = np.zeros(shape)
        self.sums = np.zeros(shape)
        self.pos_sums = np.zeros(shape) if not sparse else self.sums
        self.rank_sums = np.zeros(shape)
        self.total_fires = np.zeros(n_units)
        self.total_pos = np.zeros(n_units)

    def calibrate(self, blocks: Iterable[Any]) -> None:
        """Fix the bins from sample blocks (n, units) of activations (torch tensors)."""
        lo = np.full(self.n_units, np.inf, np.float32)
        hi = np.full(self.n_units, -np.inf, np.float32)
        for b in blocks:
            if len(b):
                lo = np.minimum(lo, b.amin(0).numpy())
                hi = np.maximum(hi, b.amax(0).numpy())
        if self.sparse:
            fallback = float(hi.max()) if np.any(hi > 0) else 1.0
            self.hi = np.where(hi > 0, hi, fallback).astype(np.float32)
        elif np.all(np.isfinite(lo)):
            pad = np.maximum(hi - lo, 1e-6) * 0.05
            self.lo, self.hi = (lo - pad).astype(np.float32), (hi + pad).astype(np.float32)

    def flat_bins(self, a: Any, s: int, e: int) -> Any:
        """``unit * n_bins + bin`` (int64 tensor) of activations ``a`` (n, e - s) of units s..e."""
        import torch

        B = self.bins
        if self.sparse:  # bin 0: a <= 0; bins 1..B: linear in sqrt(a / hi)
            inv = torch.from_numpy(1.0 / self.hi[s:e])
            b = (a * inv).clamp_(0.0, 1.0).sqrt_().mul_(B).floor_().clamp_max_(B - 1).add_(1)
            b.masked_fill_(a <= 0, 0.0)
        else:
            lo = torch.from_numpy(self.lo[s:e])
            scale = torch.from_numpy(B / (self.hi[s:e] - self.lo[s:e]))
            b = (a - lo).mul_(scale).clamp_(0.0, B - 1).floor_()
        # integers stay exact in float32 (< 2**24) since n_bins * UNIT_BLOCK is far below
        b.add_(torch.arange(e - s, dtype=torch.float32).mul_(self.n_bins))
        return b.long()

    def add_pass1(self, a: Any) -> None:
        """Histogram the units' activations ``a`` (n, units) float32 tensor."""
        import torch

        for s in range(0, self.n_units, UNIT_BLOCK):
            e = min(self.n_units, s + UNIT_BLOCK)
            counts = torch.bincount(self.flat_bins(a[:, s:e], s, e).view(-1),
                                    minlength=(e - s) * self.n_bins)
            self.hist[s:e] += counts.view(e - s, self.n_bins).numpy()

    def finish_pass1(self) -> None:
        import torch

        n = self.hist.sum(axis=1, keepdims=True).astype(np.float64)
        below = np.cumsum(self.hist, axis=1) - self.hist
        mid = (below + (self.hist + 1) / 2.0) / np.maximum(n, 1)
        self.midrank = torch.from_numpy(mid)  # float64, like the rank sums (see add_pass2)

    def add_pass2(self, y: Any, a: Any) -> None:
        """Accumulate label sums: ``y`` (n, labels) one-hot float32, ``a`` (n, units)."""
        yt = y.T.contiguous()
        yt64 = yt.double()
        for s in range(0, self.n_units, UNIT_BLOCK):
            e = min(self.n_units, s + UNIT_BLOCK)
            blk = a[:, s:e]
            fired = (blk > 0).float()
            ranks = self.midrank[s:e].reshape(-1).take(self.flat_bins(blk, s, e))
            self.fires[:, s:e] += (yt @ fired).double().numpy()
            self.sums[:, s:e] += (yt @ blk).double().numpy()
            # in float64: float32 sums of ranks round differently for other chunkings, and the
            # AUROC formula subtracts two large terms (1e-5 relative error otherwise)
            self.rank_sums[:, s:e] += (yt64 @ ranks).numpy()
            self.total_fires[s:e] += fired.sum(0).double().numpy()
            if self.sparse:
                self.total_pos[s:e] += blk.sum(0).double().numpy()
            else:
                pos = blk.clamp_min(0)
                self.pos_sums[:, s:e] += (yt @ pos).double().numpy()
                self.total_pos[s:e] += pos.sum(0).double().numpy()

    def results(self, labels: LabelSpace) -> dict[str, np.ndarray]:
        """firing_rate, mean_activation, auroc (labels, units) and per-unit summaries."""
        n = labels.n_tokens
        pos = labels.counts.astype(np.float64)[:, None]
        neg = n - pos
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (self.rank_sums * n - pos * (pos + 1) / 2) / (pos * neg)
            approx = self.hist[:, 1:] if self.sparse else self.hist
            bound = 0.5 * approx.max(axis=1)[None, :] / np.maximum(pos, neg)
            share = self.pos_sums / self.total_pos[None, :]
        alive = self.total_fires > 0
        best = np.argmax(np.where(np.isfinite(auroc), auroc, -np.inf), axis=0)
        units = np.arange(self.n_units)
        names = np.asarray(labels.names, dtype=object)
        return {
            "firing_rate": self.fires / pos,
            "mean_activation": self.sums / pos,
            "auroc": auroc,
            "best": best,
            "best_label": np.where(alive, names[best], ""),
            "best_attribute": np.where(alive, np.asarray(labels.attribute, object)[best], ""),
            "best_value": np.where(alive, np.asarray(labels.value, object)[best], ""),
            "best_score": np.where(alive, auroc[best, units], np.nan),
            "best_score_error": np.where(alive, bound[best, units], np.nan),
            "monosemanticity": np.where(alive, share[best, units], np.nan),
            "density": self.total_fires / max(n, 1),
        }


# -- the streaming passes ---------------------------------------------------------------


Encoder = Callable[[np.ndarray], list[Any]]


def _chunks(info: Any, labels: LabelSpace, attributes: Sequence[str], max_tokens: int | None,
            chunk: int):
    """(shard, start, stop, label matrix slice) over the selection, chunk by chunk."""
    for shard, used, codes in iter_store_attributes(info, attributes, max_tokens):
        lab = labels.matrix(codes)
        for s in range(0, used, chunk):
            e = min(used, s + chunk)
            yield shard, s, e, lab[s:e]


def _calibration(reader: Any, info: Any, n_tokens: int, piece: int) -> Iterator[np.ndarray]:
    """A deterministic sample: up to ``CALIB_BLOCKS`` evenly spaced blocks of the selection,
    in pieces of at most ``piece`` tokens."""
    sizes = [int(s["tokens"]) for s in info.manifest["shards"]]
    starts = np.cumsum([0, *sizes])
    blk = min(CALIB_BLOCK_TOKENS, n_tokens)
    for g in np.unique(np.linspace(0, n_tokens - blk, CALIB_BLOCKS).astype(np.int64)):
        shard = int(np.searchsorted(starts, g, side="right") - 1)
        s = int(g - starts[shard])
        e = min(sizes[shard], s + blk)
        for a in range(s, e, piece):
            yield reader.read(shard, a, min(e, a + piece))


def _n_chunks(info: Any, n_tokens: int, chunk: int) -> int:
    total, left = 0, n_tokens
    for entry in info.manifest["shards"]:
        used = min(left, int(entry["tokens"]))
        total += math.ceil(used / chunk)
        left -= used
    return total


def one_hot(lab: np.ndarray, n_labels: int) -> Any:
    """(n, labels) float32 tensor with a 1 at every kept label of every token."""
    import torch

    rows, cols = np.nonzero(lab >= 0)
    y = torch.zeros(len(lab), n_labels)
    y[torch.from_numpy(rows), torch.from_numpy(lab[rows, cols])] = 1.0
    return y


def feature_token_stats(info: Any, hook: str, encode: Callable[[Any], Any] | None,
                        d_sae: int, cfg: FeatureTokenConfig, max_tokens: int | None = None,
                        progress: Callable[..., Any] | None = None,
                        ) -> tuple[LabelSpace, dict[str, dict[str, np.ndarray]]]:
    """Label statistics of the latents (``encode``: float32 tensor (n, d_model) -> (n, d_sae))
    and of the raw dimensions of ``hook``; ``{"latent": ..., "neuron": ...}`` per :meth:`UnitStats.results`."""
    import torch

    from ..preprocess import reader_for

    attributes = resolve_attributes(cfg.attributes, "feature_token.attributes")
    labels = LabelSpace.scan(info, attributes, max_tokens, cfg.min_count)
    if labels.n_tokens == 0 or len(labels) == 0:
        raise UserError(f"feature_token: no value of {', '.join(attributes)} occurs on at least "
                        f"min_count={cfg.min_count} of the {labels.n_tokens} selected tokens "
                        f"of {info.path}")
    units = {"neuron": (UnitStats(info.d_model, len(labels), cfg.bins, sparse=False), None)}
    if encode is not None:
        units["latent"] = (UnitStats(d_sae, len(labels), cfg.bins, sparse=True), encode)
    n_chunks = _n_chunks(info, labels.n_tokens, cfg.chunk_tokens)
    bar = progress(total=2 * n_chunks, desc=f"feature_token {hook}") if progress else None
    with reader_for(info, hook) as reader, torch.no_grad():
        for stats, fn in units.values():
            sample = map(torch.from_numpy,
                         _calibration(reader, info, labels.n_tokens, cfg.chunk_tokens))
            stats.calibrate(fn(x).float() if fn else x for x in sample)
        for pass_ in (1, 2):
            for shard, s, e, lab in _chunks(info, labels, attributes, max_tokens, cfg.chunk_tokens):
                x = torch.from_numpy(reader.read(shard, s, e))
                y = one_hot(lab, len(labels)) if pass_ == 2 else None
                for stats, fn in units.values():
                    a = fn(x).float() if fn else x
                    stats.add_pass1(a) if pass_ == 1 else stats.add_pass2(y, a)
                if bar is not None:
                    bar.update(1)
            if pass_ == 1:
                for stats, _ in units.values():
                    stats.finish_pass1()
    if bar is not None:
        bar.close()
    return labels, {kind: stats.results(labels) for kind, (stats, _) in units.items()}


# -- outputs ----------------------------------------------------------------------------


def to_dataset(labels: LabelSpace, results: dict[str, dict[str, np.ndarray]],
               attrs: dict[str, Any]) -> Any:
    """The xarray Dataset written to ``<hook>.nc`` (raw baseline variables prefixed ``raw_``)."""
    import xarray as xr

    coords = {"label": labels.names, "attribute": ("label", labels.attribute),
              "value": ("label", labels.value), "label_count": ("label", labels.counts)}
    data: dict[str, Any] = {}
    for kind, prefix in (("latent", ""), ("neuron", "raw_")):
        if kind not in results:
            continue
        r = results[kind]
        coords[kind] = np.arange(len(r["density"]))
        for key in ("firing_rate", "mean_activation", "auroc"):
            data[prefix + key] = ((kind, "label"), r[key].T.astype(np.float32))
        for key in ("best_label", "best_attribute", "best_value"):
            data[prefix + key] = (kind, r[key].astype(str))
        for key in ("best_score", "best_score_error", "monosemanticity", "density"):
            data[prefix + key] = (kind, r[key].astype(np.float32))
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    docs = {"firing_rate": "fraction of the label's tokens on which the unit is > 0",
            "mean_activation": "mean activation on the label's tokens",
            "auroc": "AUROC of the activation for label vs every other token (binned, see attrs)",
            "best_score": "highest AUROC over labels", "best_score_error":
            "bound on |binned - exact| AUROC of the best label",
            "monosemanticity": "share of the unit's positive activation mass on its best label",
            "density": "fraction of all selected tokens on which the unit is > 0"}
    for name in ds.data_vars:
        key = str(name).removeprefix("raw_")
        if key in docs:
            ds[name].attrs["long_name"] = docs[key]
    return ds


def write_summary_csv(path: Path, r: dict[str, np.ndarray]) -> None:
    """Latents sorted by best score (dead latents last)."""
    order = np.argsort(-np.nan_to_num(r["best_score"], nan=-1.0), kind="stable")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["latent", "best_label", "best_score", "best_score_error", "monosemanticity",
                    "density", "firing_rate_on_best", "mean_activation_on_best"])
        for u in order:
            b = r["best"][u]
            w.writerow([int(u), r["best_label"][u], _f(r["best_score"][u]),
                        _f(r["best_score_error"][u]), _f(r["monosemanticity"][u]),
                        _f(r["density"][u]), _f(r["firing_rate"][b, u]),
                        _f(r["mean_activation"][b, u])])


def _f(x: float) -> str:
    return "" if not np.isfinite(x) else f"{float(x):.4g}"


def hook_summary(r: dict[str, dict[str, np.ndarray]], n: int = 5) -> dict[str, Any]:
    """Counts of well-explained units and the ``n`` best distinct labels (with their best latent)."""
    lat = r.get("latent", r["neuron"])
    score = np.nan_to_num(lat["best_score"], nan=-1.0)
    good = score > GOOD_SCORE
    top: list[dict[str, Any]] = []
    for u in np.argsort(-score, kind="stable"):
        label = str(lat["best_label"][u])
        if score[u] < 0 or len(top) == n:
            break
        if any(t["label"] == label for t in top):
            continue
        top.append({"label": label, "score": round(float(score[u]), 4), "latent": int(u),
                    "latents_gt_0.9": int((good & (lat["best_label"] == label)).sum())})
    return {
        "latents": len(score), "alive": int((lat["density"] > 0).sum()),
        "score_gt_0.9": int(good.sum()),
        "raw_score_gt_0.9": int((np.nan_to_num(r["neuron"]["best_score"]) > GOOD_SCORE).sum()),
        "top": top,
    }


def summary_markdown(per_hook: dict[str, dict[str, Any]], n_tokens: int, top_n: int,
                     tables: dict[str, dict[str, np.ndarray]]) -> str:
    lines = ["# feature_token", "",
             f"{n_tokens} tokens. AUROC of each unit's activation for `attribute=value` vs all "
             f"other tokens; monosemanticity = share of the unit's activation mass on its best "
             f"label. Note: {BEAT_NOTE}.", ""]
    for hook, s in per_hook.items():
        r = tables[hook]
        lines += [f"## {hook}", "",
                  f"{s['alive']}/{s['latents']} latents alive; {s['score_gt_0.9']} with best AUROC "
                  f"> {GOOD_SCORE} (raw dimensions: {s['raw_score_gt_0.9']}).", "",
                  "| latent | best label | AUROC | monosemanticity | density |",
                  "|---:|---|---:|---:|---:|"]
        order = np.argsort(-np.nan_to_num(r["best_score"], nan=-1.0), kind="stable")[:top_n]
        for u in order:
            lines.append(f"| {u} | {r['best_label'][u]} | {_f(r['best_score'][u])} | "
                         f"{_f(r['monosemanticity'][u])} | {_f(r['density'][u])} |")
        lines.append("")
    return "\n".join(lines)


class FeatureTokenAnalyzer(Analyzer):
    """Per latent and per raw dimension: firing rate, mean activation and AUROC per attribute value."""

    name = "feature_token"
    description = ("Firing rate, mean activation and streaming AUROC of every latent (and raw "
                   "dimension) per musical attribute value; best label and monosemanticity.")
    Config = FeatureTokenConfig

    def analyze(self, ctx: Any) -> dict[str, Any]:
        cfg: FeatureTokenConfig = self.config
        caps = [m for m in (cfg.max_tokens, ctx.max_tokens) if m is not None]
        max_tokens = min(caps) if caps else None
        info = ctx.store
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {}
        tables: dict[str, dict[str, np.ndarray]] = {}
        n_tokens = 0
        for hook in ctx.dictionaries:
            dictionary = ctx.load_dictionary(hook)
            labels, results = feature_token_stats(
                info, hook, dictionary.encode_host, int(dictionary.d_sae), cfg, max_tokens,
                ctx.progress)
            n_tokens = labels.n_tokens
            attrs = {"hook": hook, "store_id": info.manifest.get("store_id", ""),
                     "store": str(info.path), "dictionary": str(ctx.dictionaries[hook]),
                     "n_tokens": labels.n_tokens, "bins": cfg.bins, "min_count": cfg.min_count,
                     "beat_note": BEAT_NOTE,
                     "auroc_method": "two-pass binned mid-rank sums (see best_score_error)"}
            ds = to_dataset(labels, results, attrs)
            tmp = out / f".{hook}.nc.tmp"
            ds.to_netcdf(tmp)
            tmp.replace(out / f"{hook}.nc")
            write_summary_csv(out / f"{hook}_summary.csv", results["latent"])
            summary[hook] = hook_summary(results)
            tables[hook] = results["latent"]
        (out / "summary.md").write_text(summary_markdown(summary, n_tokens, cfg.top_n, tables))
        return {"tokens": n_tokens, "hooks": summary}
