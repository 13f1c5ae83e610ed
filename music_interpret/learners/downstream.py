"""Downstream loss: how much of the model's next-token performance a dictionary preserves.

On held-out songs the model runs through ``adapter.patched_logits`` at the dictionary's
hook point, under four conditions:

* ``clean``: the activation untouched;
* ``spliced``: the activation replaced by the dictionary's reconstruction
  ``decode(encode(x))`` (raw activation space);
* ``zero_ablated``: the activation replaced by zeros (SAEBench's ablation);
* ``ablated``: the activation replaced by its mean over the evaluated tokens (mean ablation).

Per output field (the keys of ``patched_logits``: MMT's six fields, a language model's one
``token``) and for ``total`` (their sum), over real targets, each
condition's next-token cross-entropy (nats; a mean over targets: per-song sums over all
songs divided by the number of targets), and

* ``delta_ce = spliced - clean``;
* ``kl``: the mean KL divergence KL(p_clean || p_spliced) of each field's predicted
  distribution (``total``: their sum, the KL of the product distribution); ``kl_ablated``
  and ``kl_zero_ablated`` the same for the two ablations;
* ``recovered = (ablated - spliced) / (ablated - clean)`` against mean ablation and
  ``recovered_zero`` against zero ablation (SAEBench's ``ce_loss_score``): 1 when
  splicing costs nothing, 0 when it is as bad as the ablation, ``None`` when ablating
  does not raise the loss; ``kl_recovered(_zero) = (KL_ablation - KL_spliced) /
  KL_ablation`` (SAEBench's ``kl_div_score``);
* ``ci``: percentile bootstrap 95% intervals of ``delta_ce``, ``kl``, ``recovered``,
  ``recovered_zero``, ``kl_recovered_zero``, resampling held-out **songs** with
  replacement (all windows of a song together; ``bootstrap`` resamples, seeded). Batches
  built without song indices are resampled by window (``ci.unit``).

The clean log-probabilities at every target (for the KL), the ablations and the mean are
computed once and cached (the cache holds ``targets x sum(vocabulary sizes)`` floats on
the model's device); each evaluation then costs one patched pass over at most
``max_windows`` windows / ``max_tokens`` tokens. With ``notes_only`` (dictionaries
trained on a store of note tokens only) splicing and ablations touch note tokens only,
and the mean is over note tokens (the adapter's note event, from the tokens' coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..interfaces import Batch

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter

#: MMT's output fields (an adapter's own are the keys its ``patched_logits`` returns)
FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
KEYS = (*FIELDS, "total")
LEVEL = 0.95
CI_KEYS = ("delta_ce", "kl", "recovered", "recovered_zero", "kl_recovered_zero")


@dataclass(frozen=True)
class DownstreamSettings:
    """How much held-out data an evaluation runs on, and the bootstrap's resamples."""

    max_windows: int = 32
    max_tokens: int = 32_768
    batch_size: int = 8
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.max_windows, self.max_tokens, self.batch_size) < 1:
            raise ValueError("max_windows, max_tokens and batch_size must be positive")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")


def select_song_windows(adapter: ModelAdapter, read: Callable[[str], Any], songs: Iterable[str],
                        settings: DownstreamSettings,
                        ) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
    """Inputs of the first windows of ``songs`` (in order) within the settings' limits, for
    each window the index of its song in ``songs``, and which of its rows are note tokens."""
    out: list[np.ndarray] = []
    index: list[int] = []
    notes: list[np.ndarray] = []
    tokens = 0
    note = None
    for s, name in enumerate(songs):
        song = adapter.tokenize(read(name))
        if note is None:
            note = adapter.event_vocabulary().note
        events = np.asarray(song.coords["event_type"])
        for w in adapter.song_windows(song):
            if len(out) >= settings.max_windows or (out and tokens + len(w.inputs) > settings.max_tokens):
                return out, index, notes
            out.append(np.asarray(w.inputs, np.int64))
            index.append(s)
            notes.append(events[w.token] == note)
            tokens += len(w.inputs)
    return out, index, notes


def select_windows(adapter: ModelAdapter, read: Callable[[str], Any], songs: Iterable[str],
                   settings: DownstreamSettings) -> list[np.ndarray]:
    """Inputs of the first windows of ``songs`` (in order) within the settings' limits."""
    return select_song_windows(adapter, read, songs, settings)[0]


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Windows sorted by length (little padding), cut into batches of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def make_batches(windows: Sequence[np.ndarray], batch_size: int,
                 songs: Sequence[int] | None = None) -> list[Batch]:
    """Padded batches of windows (inputs (L, ...)) sorted by length (see :func:`batch_order`);
    ``songs`` (one per window) become each batch's ``Batch.song``."""
    batches = []
    for rows in batch_order([len(w) for w in windows], batch_size):
        wins = [windows[i] for i in rows]
        t = max(len(w) for w in wins)
        codes = np.zeros((len(wins), t, *wins[0].shape[1:]), np.int64)
        mask = np.zeros((len(wins), t), bool)
        for j, w in enumerate(wins):
            codes[j, : len(w)] = w
            mask[j, : len(w)] = True
        batches.append(Batch(torch.from_numpy(codes), torch.from_numpy(mask),
                             song=[int(songs[i]) for i in rows] if songs is not None else []))
    return batches


def pad_masks(masks: Sequence[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    """Per-window row masks padded (False) into the batches :func:`make_batches` makes."""
    out = []
    for rows in batch_order([len(m) for m in masks], batch_size):
        padded = np.zeros((len(rows), max(len(masks[i]) for i in rows)), bool)
        for j, i in enumerate(rows):
            padded[j, : len(masks[i])] = masks[i]
        out.append(torch.from_numpy(padded))
    return out


def note_rows(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """(B, T) bool: the real rows of ``batch`` that are note tokens (coordinates of the rows
    in the adapter's vocabulary)."""
    note = adapter.event_vocabulary().note
    codes, mask = np.asarray(batch.codes), np.asarray(batch.mask)
    rows = np.zeros(mask.shape, bool)
    for i in range(len(codes)):
        n = int(mask[i].sum())
        rows[i, :n] = np.asarray(adapter.token_metadata(codes[i, :n])["event_type"]) == note
    return torch.from_numpy(rows)


@dataclass
class _Sums:
    """Per-group (song) sums of one condition: cross-entropy and KL from clean, (groups, fields)."""

    ce: np.ndarray
    kl: np.ndarray


class DownstreamEvaluator:
    """Clean / spliced / zero- and mean-ablated losses of ``adapter`` at ``hook`` on fixed
    batches (see the module doc).

    ``dictionary`` passed to :meth:`evaluate` acts on raw activations (``encode``,
    ``decode``); it must live on the adapter's device.
    """

    def __init__(self, adapter: ModelAdapter, hook: str, batches: Sequence[Batch], *,
                 notes_only: bool = False, notes: Sequence[torch.Tensor] | None = None,
                 bootstrap: int = 1000, seed: int = 0) -> None:
        if not batches:
            raise ValueError("downstream evaluation needs at least one batch of windows")
        self.adapter, self.hook, self.batches = adapter, hook, list(batches)
        self.bootstrap, self.seed = bootstrap, seed
        self.weights = [int(b.mask[:, 1:].sum()) for b in self.batches]
        if notes_only and notes is None:
            notes = [note_rows(adapter, b) for b in self.batches]
        self.where = [(b.mask & n) if notes_only else b.mask.clone()
                      for b, n in zip(self.batches, notes or [None] * len(self.batches), strict=True)]
        self.unit = "song" if all(len(b.song) == len(b.codes) for b in self.batches) else "window"
        keys = [list(b.song) if self.unit == "song" else [(i, j) for j in range(len(b.codes))]
                for i, b in enumerate(self.batches)]
        ids = {k: n for n, k in enumerate(dict.fromkeys(k for ks in keys for k in ks))}
        self.group = [np.asarray([ids[k] for k in ks], np.int64) for ks in keys]
        self.n_groups = len(ids)
        self.targets = np.zeros(self.n_groups)
        for b, g in zip(self.batches, self.group, strict=True):
            np.add.at(self.targets, g, torch.as_tensor(b.mask)[:, 1:].sum(1).cpu().numpy())
        self._clean_lp: list[list[torch.Tensor]] | None = None
        self._sums: dict[str, _Sums] = {}
        self._mean: torch.Tensor | None = None
        self.fields: tuple[str, ...] = FIELDS  # the adapter's, from its first logits

    @property
    def keys(self) -> tuple[str, ...]:
        """The output fields and ``total``."""
        return (*self.fields, "total")

    @classmethod
    def for_songs(cls, adapter: ModelAdapter, hook: str, read: Callable[[str], Any],
                  songs: Iterable[str], settings: DownstreamSettings | None = None, *,
                  notes_only: bool = False) -> DownstreamEvaluator | None:
        """An evaluator on the first windows of ``songs`` (``read(name)``: a song of the
        adapter's dataset); None when they give no window."""
        settings = settings or DownstreamSettings()
        windows, index, notes = select_song_windows(adapter, read, songs, settings)
        keep = [i for i, w in enumerate(windows) if len(w) >= 2]
        if not keep:
            return None
        batches = make_batches([windows[i] for i in keep], settings.batch_size,
                               [index[i] for i in keep])
        masks = pad_masks([notes[i] for i in keep], settings.batch_size)
        return cls(adapter, hook, batches, notes_only=notes_only, notes=masks,
                   bootstrap=settings.bootstrap, seed=settings.seed)

    @property
    def tokens(self) -> int:
        """Tokens the patch replaces (real tokens, or note tokens with ``notes_only``)."""
        return int(sum(int(w.sum()) for w in self.where))

    # -- passes ---------------------------------------------------------------------------

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> _Sums:
        """Per-group sums of every field's cross-entropy and KL(clean || this) over targets."""
        first = self._clean_lp is None and fn is None
        cache: list[list[torch.Tensor]] = []
        ce: np.ndarray | None = None
        kl: np.ndarray | None = None
        for i, (batch, where) in enumerate(zip(self.batches, self.where, strict=True)):
            logits = self.adapter.patched_logits(batch, self.hook,
                                                 None if fn is None else _masked(fn, where))
            if ce is None or kl is None:
                self.fields = tuple(logits)
                ce, kl = np.zeros((self.n_groups, len(self.fields))), np.zeros((self.n_groups, len(self.fields)))
            device = logits[self.fields[0]].device
            keep = torch.as_tensor(batch.mask, device=device)[:, 1:]
            rows, cols = keep.nonzero(as_tuple=True)
            # (targets, fields): one code per field (MMT), or the token id (a language model)
            target = torch.as_tensor(batch.codes, device=device)[:, 1:][rows, cols].long().reshape(len(rows), -1)
            per_batch: list[torch.Tensor] = []
            for f, name in enumerate(self.fields):
                lp = torch.log_softmax(logits[name][:, :-1][rows, cols].float(), dim=-1)
                tok_ce = -lp.gather(1, target[:, f, None])[:, 0]
                np.add.at(ce[:, f], self.group[i], _row_sums(tok_ce, rows, len(batch.codes)))
                if first:
                    per_batch.append(lp)
                elif self._clean_lp is not None:
                    clean = self._clean_lp[i][f]
                    tok_kl = (clean.exp() * (clean - lp)).sum(-1)
                    np.add.at(kl[:, f], self.group[i], _row_sums(tok_kl, rows, len(batch.codes)))
            cache.append(per_batch)
        assert ce is not None and kl is not None
        if first:
            self._clean_lp = cache
        return _Sums(ce, kl)

    def _condition(self, name: str) -> _Sums:
        if name not in self._sums:
            if name == "clean":
                self._sums[name] = self._run(None)
            else:
                self._condition("clean")
                if name == "zero_ablated":
                    self._sums[name] = self._run(torch.zeros_like)
                else:
                    mean = self.mean_activation()
                    self._sums[name] = self._run(lambda x: mean.to(x).expand_as(x))
        return self._sums[name]

    def mean_activation(self) -> torch.Tensor:
        """Mean activation (d_model,) at the hook over the patched tokens of the batches."""
        if self._mean is None:
            acc, n = None, 0
            for batch, where in zip(self.batches, self.where, strict=True):
                x = self.adapter.run_with_hooks(batch, [self.hook])[self.hook].double()
                m = where.to(x.device)
                s = x[m].sum(0)
                acc, n = (s if acc is None else acc + s), n + int(m.sum())
            assert acc is not None
            self._mean = (acc / max(n, 1)).float()
        return self._mean

    def _losses(self, sums: _Sums) -> dict[str, float]:
        return _keyed(_ratio(sums.ce.sum(0, keepdims=True), self.targets.sum(keepdims=True)), self.keys)[0]

    def clean(self) -> dict[str, float]:
        return self._losses(self._condition("clean"))

    def ablated(self) -> dict[str, float]:
        return self._losses(self._condition("ablated"))

    def zero_ablated(self) -> dict[str, float]:
        return self._losses(self._condition("zero_ablated"))

    # -- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dictionary: torch.nn.Module) -> dict[str, Any]:
        """Per-field losses of the four conditions, ΔCE, KL, the fractions of loss
        recovered and their bootstrap intervals over songs (see the module doc)."""
        sums = {name: self._condition(name) for name in ("clean", "zero_ablated", "ablated")}
        sums["spliced"] = self._run(lambda x: dictionary(x.float()).to(x.dtype))
        point = _statistics(sums, self.targets, np.ones((1, self.n_groups)))
        out: dict[str, Any] = {
            "hook_point": self.hook, "windows": sum(len(b.codes) for b in self.batches),
            "songs": self.n_groups if self.unit == "song" else None, "tokens": self.tokens,
            "targets": sum(self.weights)}
        for key, value in point.items():
            out[key] = _keyed(value, self.keys)[0]
        out["ci"] = self._intervals(sums)
        return out

    def _intervals(self, sums: dict[str, _Sums]) -> dict[str, Any]:
        ci: dict[str, Any] = {"level": LEVEL, "resamples": self.bootstrap, "unit": self.unit,
                              "method": f"percentile bootstrap, resampling {self.unit}s"}
        if self.bootstrap < 1:
            return ci
        rng = np.random.default_rng(self.seed)
        w = rng.multinomial(self.n_groups, np.full(self.n_groups, 1 / self.n_groups),
                            size=self.bootstrap).astype(np.float64)
        boot = _statistics(sums, self.targets, w)
        for key in CI_KEYS:
            ci[key] = dict(zip(self.keys, (_percentiles(boot[key][:, j]) for j in range(len(self.keys))),
                               strict=True))
        return ci


def _row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> np.ndarray:
    """Sum of per-target ``values`` per batch row, as float64 on the host."""
    out = torch.zeros(n_rows, dtype=torch.float64, device=values.device)
    out.index_add_(0, rows, values.double())
    return out.cpu().numpy()


def _ratio(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(m, fields + 1): per-field means ``sums / counts`` of (m, fields) sums plus their ``total``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts.reshape(-1, 1)
    return np.concatenate([mean, mean.sum(1, keepdims=True)], axis=1)


def _fraction(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den > 1e-9`` (and both are finite), else NaN."""
    ok = (den > 1e-9) & np.isfinite(num)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def _statistics(sums: dict[str, _Sums], targets: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every reported statistic, (m, fields + 1) each, for m weightings ``w`` (m, groups) of the groups."""
    n = w @ targets
    ce = {k: _ratio(w @ s.ce, n) for k, s in sums.items()}
    kl = {k: _ratio(w @ s.kl, n) for k, s in sums.items() if k != "clean"}
    return {
        "clean": ce["clean"], "spliced": ce["spliced"], "ablated": ce["ablated"],
        "zero_ablated": ce["zero_ablated"], "delta_ce": ce["spliced"] - ce["clean"],
        "kl": kl["spliced"], "kl_ablated": kl["ablated"], "kl_zero_ablated": kl["zero_ablated"],
        "recovered": _fraction(ce["ablated"] - ce["spliced"], ce["ablated"] - ce["clean"]),
        "recovered_zero": _fraction(ce["zero_ablated"] - ce["spliced"],
                                    ce["zero_ablated"] - ce["clean"]),
        "kl_recovered": _fraction(kl["ablated"] - kl["spliced"], kl["ablated"]),
        "kl_recovered_zero": _fraction(kl["zero_ablated"] - kl["spliced"], kl["zero_ablated"]),
    }


def _keyed(values: np.ndarray, keys: Sequence[str] = KEYS) -> list[dict[str, float | None]]:
    """Rows of (m, len(keys)) as ``{key: value}`` dicts (NaN -> None)."""
    return [{k: (float(v) if math.isfinite(v) else None) for k, v in zip(keys, row, strict=True)}
            for row in np.atleast_2d(values)]


def _percentiles(values: np.ndarray) -> list[float] | None:
    """The central ``LEVEL`` interval of the finite ``values``; None when there are none."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    lo, hi = np.percentile(finite, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return [float(lo), float(hi)]


def _masked(fn: Callable[[torch.Tensor], torch.Tensor],
            where: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied at the positions of ``where`` (B, T) only."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        return torch.where(where.to(x.device)[..., None], fn(x).to(x.dtype), x)

    return patch


def recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(ablated - spliced) / (ablated - clean); None when ablation does not raise the loss."""
    gap = ablated - clean
    if not gap > 1e-9 or not math.isfinite(spliced):
        return None
    return (ablated - spliced) / gap


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of an evaluation: ``<field>_recovered``, ``<field>_recovered_zero``,
    ``<field>_ce_<condition>``, ``<field>_delta_ce`` and ``<field>_kl``."""
    out: dict[str, float] = {}
    for k in (result.get("clean") or {}) or KEYS:
        for name in ("recovered", "recovered_zero"):
            value = (result.get(name) or {}).get(k)
            if value is not None:
                out[f"{k}_{name}"] = float(value)
        for kind in ("spliced", "clean", "ablated", "zero_ablated"):
            value = (result.get(kind) or {}).get(k)
            if value is not None:
                out[f"{k}_ce_{kind}"] = float(value)
        for name, tag in (("delta_ce", "delta_ce"), ("kl", "kl")):
            value = (result.get(name) or {}).get(k)
            if value is not None:
                out[f"{k}_{tag}"] = float(value)
    return out
