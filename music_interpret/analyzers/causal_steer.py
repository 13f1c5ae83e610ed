"""Steering: continuations generated with ``alpha * W_dec[i]`` added at the hook, against the
same seeds unsteered.

Prompts are the start of the first window of held-out songs (the header and the first
``prompt_notes`` notes). Each prompt is continued ``seeds`` times by ``steps`` codes with
the model's own decoding rules (``adapter.generate``); the steered run of a seed uses the
same seed as its unsteered twin. For a label ``X=v`` (or ``next.X=v``) the measure is the
share of generated tokens with attribute X = v among the generated tokens where X applies
(e.g. notes for ``pitch_class``), pooled over the generations; the shift is the steered
share minus the unsteered one, with a percentile bootstrap interval resampling the
(prompt, seed) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..doors import EventVocabulary
from .attributes import NEXT, attributes_for, compute_attributes
from .causal_data import EvalData
from .causal_stats import LEVEL

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter


@dataclass(frozen=True)
class SteerSettings:
    """How much to generate."""

    prompts: int = 4
    seeds: int = 2
    prompt_notes: int = 16
    steps: int = 32
    temperature: float = 1.0
    filter_thres: float = 0.9
    seed: int = 0
    bootstrap: int = 1000


@dataclass
class Generation:
    """One continuation: its prompt, the new codes and the seed it was drawn with."""

    prompt: np.ndarray
    new: np.ndarray
    seed: int


def make_prompts(data: EvalData, settings: SteerSettings) -> list[np.ndarray]:
    """The header and first ``prompt_notes`` notes of the first window of each held-out song
    (songs with fewer notes are passed over), up to ``prompts`` prompts."""
    out: list[np.ndarray] = []
    seen: set[int] = set()
    for codes, song, note in zip(data.windows, data.window_song, data.window_notes, strict=True):
        if song in seen or len(out) >= settings.prompts:
            continue
        seen.add(song)
        notes = np.flatnonzero(note)
        if len(notes) >= settings.prompt_notes > 0:
            out.append(codes[: notes[settings.prompt_notes - 1] + 1].copy())
    return out


def generate_all(adapter: ModelAdapter, prompts: Sequence[np.ndarray], settings: SteerSettings,
                 patch: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 ) -> list[Generation]:
    """``seeds`` continuations of every prompt; seed ``settings.seed + 1000 * prompt + s``."""
    out = []
    for p, prompt in enumerate(prompts):
        for s in range(settings.seeds):
            seed = settings.seed + 1000 * p + s
            new = adapter.generate(prompt, settings.steps, seed=seed,
                                   temperature=settings.temperature,
                                   filter_thres=settings.filter_thres, patch=patch)
            out.append(Generation(prompt, np.asarray(new), seed))
    return out


def measurable(label: str, vocabulary: EventVocabulary | None = None) -> bool:
    """Whether the steering measure exists for ``label`` (an attribute of single tokens)."""
    attribute, _, value = label.partition("=")
    base = attribute.removeprefix(NEXT)
    table = attributes_for(vocabulary)
    return base in table and value in table[base].labels


def label_counts(adapter: ModelAdapter, gens: Sequence[Generation], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Per generation: (generated tokens with the label's value, generated tokens where the
    label's attribute applies)."""
    attribute, _, value = label.partition("=")
    base = attribute.removeprefix(NEXT)
    vocabulary = adapter.event_vocabulary()
    code = attributes_for(vocabulary)[base].labels.index(value)
    hits, defined = np.zeros(len(gens)), np.zeros(len(gens))
    for i, g in enumerate(gens):
        if not len(g.new):
            continue
        codes = np.concatenate([g.prompt, g.new])
        meta = adapter.token_metadata(codes)
        n = len(codes)
        coords = {"song": np.zeros(n, np.int64), "song_token": np.arange(n),
                  "window": np.zeros(n, np.int64), "seq_pos": np.arange(n),
                  **{k: np.asarray(meta[k]) for k in ("event_type", "beat", "position", "pitch",
                                                     "duration", "instrument")}}
        values = compute_attributes(coords, [base], vocabulary=vocabulary)[base][len(g.prompt):]
        hits[i], defined[i] = float(np.sum(values == code)), float(np.sum(values >= 0))
    return hits, defined


def shift(base: tuple[np.ndarray, np.ndarray], steered: tuple[np.ndarray, np.ndarray],
          resamples: int, seed: int) -> dict[str, Any]:
    """Pooled shares unsteered and steered, their difference and its bootstrap interval
    (resampling generation pairs)."""
    (bh, bd), (sh, sd) = base, steered

    def shares(idx: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return sh[idx].sum(-1) / sd[idx].sum(-1) - bh[idx].sum(-1) / bd[idx].sum(-1)

    n = len(bh)
    out: dict[str, Any] = {
        "share_unsteered": float(bh.sum() / bd.sum()) if bd.sum() else None,
        "share_steered": float(sh.sum() / sd.sum()) if sd.sum() else None,
        "tokens_unsteered": int(bd.sum()), "tokens_steered": int(sd.sum()), "pairs": n}
    out["shift"] = (out["share_steered"] - out["share_unsteered"]
                    if out["share_steered"] is not None and out["share_unsteered"] is not None
                    else None)
    out["ci"] = None
    if n and resamples > 0:
        rng = np.random.default_rng(seed)
        values = shares(rng.integers(0, n, size=(resamples, n)))
        values = values[np.isfinite(values)]
        if len(values):
            lo, hi = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
            out["ci"] = [float(lo), float(hi)]
    return out


def steer_latent(adapter: ModelAdapter, hook: str, direction: torch.Tensor, label: str,
                 alphas: Sequence[tuple[float, float]], prompts: Sequence[np.ndarray],
                 baseline: Sequence[Generation], settings: SteerSettings) -> list[dict[str, Any]]:
    """Per ``(multiple, alpha)``: the shift of the label's share when ``alpha * direction`` is
    added at ``hook`` at every position (see the module doc)."""
    base = label_counts(adapter, baseline, label)
    out = []
    for multiple, alpha in alphas:
        vec = (alpha * direction).detach()

        def add(x: torch.Tensor, v: torch.Tensor = vec) -> torch.Tensor:
            return x + v.to(x)

        gens = generate_all(adapter, prompts, settings, patch=(hook, add))
        row = shift(base, label_counts(adapter, gens, label), settings.bootstrap, settings.seed)
        out.append({"alpha_multiple": multiple, "alpha": alpha, **row})
    return out
