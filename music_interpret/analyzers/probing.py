"""``probe``: linear probes for musical attributes, tested on the songs the dictionary never saw.

Per hook point and attribute (:mod:`.attributes`; by default the main musical attributes
at t and at t+1, ``next.*``, on note tokens) the probes of :mod:`.probe_fit` run on

* ``embedding``: the model's input embedding at the token: hook point ``resid_pre.0``
  when the store holds it, else the embedding the model adapter rebuilds from the token's
  coordinates (``ModelAdapter.embed_coordinates``; MMT: the sum of the six field
  embeddings, no position embedding). Whatever a probe finds
  here, the model was given, not computed;
* ``raw``: the hook point's activations;
* ``latents``: the dictionary's codes;

as multiclass probes (accuracy, macro-F1; baselines ``majority`` and ``shuffled``) and as
one-vs-rest k-sparse probes per value (AUROC, F1 for k in ``ks`` and ``all``; baselines
``constant`` and ``shuffled``). Every score has a 95% interval from resampling test songs.

**Split.** The test songs are exactly the songs the dictionary held out of its training
(:mod:`.songsplit`, from its ``config.json``), the train songs all others; only without
that record does the probe split songs itself (``test_fraction``, the analysis seed), and
the outputs say which. Up to ``max_tokens`` training and ``max_test_tokens`` test tokens
are sampled (seeded). Values with fewer than ``min_class_count`` training tokens are left
out (with their tokens).

Outputs: ``probe.nc`` / ``probe.csv`` (multiclass: hook, attribute, representation,
metric, stat), ``probe_ovr.nc`` / ``probe_ovr.csv`` (one-vs-rest: hook, label,
representation, k, metric, stat, selected units), ``probe.png``, ``probe_ovr.png`` and
``summary.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer, ModelAdapter
from ..learners.io import read_config
from .attributes import ATTRIBUTES, attributes_for, resolve_attributes
from .probe_data import TOKENS, encode_rows, read_rows, sample_sides, select_tokens, token_table
from .probe_fit import ProbeSettings, probe_attribute
from .probe_sparse import SELECT
from .songsplit import SongSplit, dictionary_split

if TYPE_CHECKING:
    from ..interfaces import StoreReader
    from .context import AnalysisContext

_BASE = ["pitch_class", "octave", "position", "duration", "instrument", "beat_step",
         "scale_degree", "chord_quality", "metric_strength", "voice_role"]
DEFAULT_ATTRIBUTES = [*_BASE, *(f"next.{a}" for a in _BASE)]
EMBEDDING_HOOK = "resid_pre.0"


@dataclass
class ProbeConfig:
    """Options of ``probe`` (see the module docstring)."""

    attributes: list[str] = field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    tokens: str = "notes"
    max_tokens: int = 10_000
    max_test_tokens: int = 5_000
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    select: str = "auroc"
    test_fraction: float = 0.1
    bootstrap: int = 200
    shuffles: int = 3
    C: float = 1.0
    max_iter: int = 100
    class_weight: str = "none"  # or "balanced" (hurts accuracy on skewed attributes)
    min_class_count: int = 10

    def __post_init__(self) -> None:
        resolve_attributes(self.attributes, "probe.attributes")
        if min(self.max_tokens, self.max_test_tokens) < 10 or self.bootstrap < 0 \
                or self.max_iter < 1 or self.C <= 0 or self.shuffles < 1:
            raise ValueError("max_tokens, max_test_tokens >= 10, bootstrap >= 0, max_iter >= 1, "
                             "shuffles >= 1 and C > 0 required")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must be distinct positive integers, got {self.ks}")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.min_class_count < 1:
            raise ValueError(f"min_class_count must be positive, got {self.min_class_count}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        self.ks = sorted(self.ks)

    def settings(self) -> ProbeSettings:
        return ProbeSettings(list(self.ks), self.C, self.max_iter, self.class_weight,
                             self.min_class_count, self.bootstrap, self.select, self.shuffles)


@dataclass
class HookRun:
    """One hook's sample, split and per-attribute results."""

    hook: str
    split: SongSplit
    index: np.ndarray
    test: np.ndarray
    results: dict[str, Any] = field(default_factory=dict)


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS and one torch thread: the probes are many small fits, for which more
    threads only contend (badly so on a busy machine)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


class Embeddings:
    """The input embedding of sampled tokens: from ``resid_pre.0`` or rebuilt from their
    coordinates by the model adapter (``ModelAdapter.embed_coordinates``)."""

    def __init__(self, ctx: AnalysisContext, info: StoreReader) -> None:
        self.info, self.source, self.note = info, "none", "no input embedding (no model)"
        self.adapter: ModelAdapter | None = None
        if EMBEDDING_HOOK in info.hooks:
            self.source, self.note = EMBEDDING_HOOK, (f"hook point {EMBEDDING_HOOK} of the store "
                                                      "(the model's input embedding, position embedding included)")
            return
        adapter = ctx.adapter("cpu")
        if adapter is not None and type(adapter).embed_coordinates is not ModelAdapter.embed_coordinates:
            self.adapter, self.source = adapter, "coordinates"

    def rows(self, index: np.ndarray, coords: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.source == EMBEDDING_HOOK:
            return read_rows(self.info, EMBEDDING_HOOK, index)
        if self.adapter is not None:
            rows, self.note = self.adapter.embed_coordinates(coords)
            return rows
        return None


class ProbeAnalyzer(Analyzer):
    """Probes for musical attributes on embedding, activations and latents, tested on held-out songs."""

    name = "probe"
    description = ("Multiclass and one-vs-rest k-sparse linear probes (input embedding, raw "
                   "activations, latents) for attributes at t and t+1, tested on the "
                   "dictionary's held-out songs, with baselines and song-bootstrap CIs.")
    Config = ProbeConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        from .probe_report import write_outputs

        cfg: ProbeConfig = self.config
        info = ctx.store
        cap = ctx.max_tokens or max(cfg.max_tokens, cfg.max_test_tokens)
        attributes = resolve_attributes(cfg.attributes, "probe.attributes")
        hooks = list(ctx.dictionaries)
        selection = select_tokens(info, cfg.tokens)
        if not len(selection.index):
            raise UserError(f"probe: no {cfg.tokens} tokens in {info.path}")
        runs = []
        for hook in hooks:
            split = dictionary_split(info.songs, read_config(ctx.dictionaries[hook]),
                                     cfg.test_fraction, ctx.seed,
                                     f"dictionary {ctx.dictionaries[hook]}")
            index, test = sample_sides(selection, split.test, min(cfg.max_tokens, cap),
                                       min(cfg.max_test_tokens, cap), ctx.seed)
            if test.all() or not test.any():
                raise UserError(f"probe: the song split of {info.path} for {hook} leaves one side "
                                f"without {cfg.tokens} tokens ({split.note})")
            runs.append(HookRun(hook, split, index, test))
        union = np.unique(np.concatenate([r.index for r in runs]))
        table = token_table(info, union, attributes, ctx.song_meters())
        embeddings = Embeddings(ctx, info)
        emb_all = embeddings.rows(union, table.coords)
        settings = cfg.settings()
        bar = ctx.progress(total=len(hooks) * len(attributes), desc="probe")
        with single_threaded():
            for run in runs:
                self._probe_hook(ctx, run, union, table, emb_all, attributes, settings, bar)
        bar.close()
        meta = {"store_id": info.store_id, "store": str(info.path),
                "tokens": cfg.tokens, "bootstrap": cfg.bootstrap, "select": cfg.select,
                "embedding": embeddings.note, "embedding_source": embeddings.source,
                "class_weight": cfg.class_weight,
                "attribute_docs": "; ".join(f"{a}: {ATTRIBUTES[a].doc}" for a in attributes)}
        return write_outputs(Path(ctx.out_dir), runs, attributes, settings, meta,
                             attributes_for(info.vocabulary))

    def _probe_hook(self, ctx: AnalysisContext, run: HookRun, union: np.ndarray, table: Any,
                    emb_all: np.ndarray | None, attributes: list[str], settings: ProbeSettings,
                    bar: Any) -> None:
        """Every attribute's probes for one hook (results into ``run.results``)."""
        info = ctx.store
        pos = np.searchsorted(union, run.index)
        dictionary = ctx.load_dictionary(run.hook)
        raw = read_rows(info, run.hook, run.index)
        inputs = {"raw": raw, "latents": encode_rows(raw, dictionary.encode_host)}
        if emb_all is not None:
            inputs["embedding"] = emb_all[pos]
        songs = table.song[pos]
        for attr in attributes:
            run.results[attr] = probe_attribute(table.codes[attr][pos], run.test, songs, inputs,
                                                settings, ctx.seed)
            bar.update(1)
