"""The ``note_share`` analyzer: how much of each latent's firing falls on note tokens.

A template for third-party analyzers: it reads the activation store through the typed
reader (``ctx.store``), loads each hook point's dictionary with ``ctx.load_dictionary``
and writes only into ``ctx.out_dir``:

- ``<hook>.json``: per latent, the tokens it fires on and the share of them that are note
  tokens (the store's event vocabulary says which event type carries a note);
- ``summary.md``: the most note-specific and the least note-specific live latents, which
  the report shows in this analyzer's own section.

The returned summary (per hook: tokens read, live latents, latents firing only on notes)
goes to the run manifest; the report shows it in the same section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from music_interpret.plugin import AnalysisContext, Analyzer


@dataclass
class NoteShareConfig:
    """Options of ``note_share``."""

    top: int = 5  # latents listed at each end in summary.md

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ValueError(f"top must be at least 1, got {self.top}")


class NoteShare(Analyzer):
    """Share of each latent's firings that fall on note tokens."""

    name = "note_share"
    description = "Per latent: tokens it fires on and the share of them that are note tokens."
    Config = NoteShareConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        cfg: NoteShareConfig = self.config
        store = ctx.store
        note = store.vocabulary.note
        summary: dict[str, Any] = {}
        lines = ["# Share of each latent's firings on note tokens", ""]
        for hook in ctx.dictionaries:
            dictionary = ctx.load_dictionary(hook)
            fires = np.zeros(dictionary.d_sae, np.int64)
            on_notes = np.zeros(dictionary.d_sae, np.int64)
            tokens = 0
            for shard, used, coords in store.iter_coords(["event_type"], ctx.max_tokens):
                codes = dictionary.encode_host(store.read_block(shard, hook, 0, used)).numpy() > 0
                is_note = coords["event_type"][:used] == note
                fires += codes.sum(axis=0)
                on_notes += codes[is_note].sum(axis=0)
                tokens += used
            share = np.divide(on_notes, fires, out=np.full(len(fires), np.nan), where=fires > 0)
            (ctx.out_dir / f"{hook}.json").write_text(json.dumps(
                {"hook": hook, "tokens": tokens, "fires": fires.tolist(),
                 "note_share": [None if np.isnan(s) else float(s) for s in share]}))
            live = np.flatnonzero(fires > 0)
            ranked = live[np.argsort(-share[live], kind="stable")]
            lines += [f"## {hook} ({tokens} tokens, {len(live)} live latents)", "",
                      "most note-specific: " + _latents(ranked[: cfg.top], share),
                      "least note-specific: " + _latents(ranked[::-1][: cfg.top], share), ""]
            summary[hook] = {"tokens": tokens, "live_latents": int(len(live)),
                             "note_only_latents": int((share[live] == 1.0).sum())}
        (ctx.out_dir / "summary.md").write_text("\n".join(lines))
        return summary


def _latents(indices: np.ndarray, share: np.ndarray) -> str:
    return ", ".join(f"{int(i)} ({share[i]:.0%})" for i in indices) or "none"
