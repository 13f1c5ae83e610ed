"""One hook of the ``causal`` analyzer: data, controls, ablations, effects, verdicts, steering
(definitions in :mod:`music_interpret.analyzers.causal`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .causal_ablation import LabelSpec, LatentSums, firing_counts, measure, scored_counts
from .causal_data import EvalData, heldout_data, heldout_names
from .causal_stats import (
    INSUFFICIENT,
    NOT_USED,
    USED,
    Rule,
    bootstrap_interval,
    effect_kind,
    field_means,
    point,
    select_controls,
    verdict,
)
from .causal_steer import SteerSettings, generate_all, make_prompts, measurable, steer_latent

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter, SongDataset


@dataclass(frozen=True)
class Target:
    """A latent to test, the label it is claimed to code for (``""``: none) and its source."""

    latent: int
    label: str = ""
    when: str = ""
    source: str = ""


@dataclass(frozen=True)
class HookSettings:
    """Everything :func:`run_on_data` and :func:`causal_hook` need from the config."""

    tokens: str = "notes"
    max_windows: int = 32
    max_tokens: int = 16_384
    batch_size: int = 8
    pass_tokens: int = 16_384
    n_controls: int = 8
    fallback_top: int = 8
    seed: int = 0
    rule: Rule = field(default_factory=Rule)
    steer_latents: int = 4
    alphas: tuple[float, ...] = (2.0, 8.0)
    steer: SteerSettings = field(default_factory=SteerSettings)

    @classmethod
    def from_config(cls, cfg: Any, tokens: str, seed: int) -> HookSettings:
        return cls(tokens=tokens, max_windows=cfg.max_windows, max_tokens=cfg.max_tokens,
                   batch_size=cfg.batch_size, pass_tokens=cfg.pass_tokens,
                   n_controls=cfg.n_controls, fallback_top=cfg.fallback_top, seed=seed,
                   rule=Rule(cfg.min_firing, cfg.min_songs, cfg.min_controls, cfg.bootstrap),
                   steer_latents=cfg.steer_latents, alphas=tuple(cfg.alphas),
                   steer=SteerSettings(cfg.steer_prompts, cfg.steer_seeds, cfg.steer_prompt_notes,
                                       cfg.steer_steps, cfg.temperature, cfg.filter_thres, seed,
                                       cfg.bootstrap))


def label_spec(adapter: ModelAdapter, label: str) -> LabelSpec:
    """What the effect of ``label`` is read from (``adapter.label_target``; ``total`` when
    the adapter cannot tell)."""
    if not label:
        return LabelSpec("", "total", None)
    attribute, _, value = label.partition("=")
    try:
        fld, codes = adapter.label_target(attribute, value)
    except (NotImplementedError, KeyError, ValueError):
        return LabelSpec(label, "total", None)
    return LabelSpec(label, fld, None if codes is None else tuple(int(c) for c in codes))


def causal_hook(adapter: ModelAdapter, hook: str, dictionary: Any, dataset: SongDataset, store_songs: Sequence[str],
                targets: list[Target] | None, finding_latents: set[int], s: HookSettings,
                progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Test ``targets`` on the dictionary's held-out songs (see :func:`run_on_data`)."""
    names = [n for n in heldout_names(getattr(dictionary, "config", {}) or {}, store_songs)
             if n in dataset]
    events = ((getattr(dictionary, "config", {}) or {}).get("data") or {}).get("events")
    data = heldout_data(adapter, dataset.read, names, max_windows=s.max_windows,
                        max_tokens=s.max_tokens, batch_size=s.batch_size,
                        notes_only_patch=events == "notes", tokens=s.tokens)
    if not data.batches:
        return {"hook": hook, "songs": [], "latents": [], "controls": {},
                "summary": {"tested": 0, "skipped": "no held-out song with a window (the "
                            "dictionary holds out no songs of this dataset)"}}
    return run_on_data(adapter, hook, dictionary, data, targets, finding_latents, s, progress)


def run_on_data(adapter: ModelAdapter, hook: str, dictionary: Any, data: EvalData,
                targets: list[Target] | None, finding_latents: set[int], s: HookSettings,
                progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Ablate every target and its controls on ``data``; effects, intervals, verdicts and
    steering. ``targets=None``: the ``fallback_top`` latents with the most activation mass."""
    counts, mass = firing_counts(adapter, hook, dictionary, data)
    density = counts / max(data.n_selected, 1)
    if targets is None:
        order = [int(i) for i in np.argsort(-mass, kind="stable")[: s.fallback_top] if mass[i] > 0]
        targets = [Target(i, "", "", "activation") for i in order]
    specs = [label_spec(adapter, t.label) for t in targets]
    labels = list({sp.name: sp for sp in specs}.values())
    index = {sp.name: i for i, sp in enumerate(labels)}
    excluded = set(finding_latents) | {t.latent for t in targets}
    usable = counts >= max(s.rule.min_firing, 1)
    controls = {t.latent: select_controls(density, t.latent, excluded, usable, s.n_controls, s.seed)
                for t in targets}
    latents = sorted({t.latent for t in targets} | {c for cs in controls.values() for c in cs})
    bar = progress(total=len(data.batches), desc=f"causal {hook}") if progress else None
    sums = measure(adapter, hook, dictionary, data, latents, labels, s.pass_tokens,
                   step=None if bar is None else lambda: bar.update(1))
    if bar is not None:
        bar.close()
    n_scored = scored_counts(data)
    rows = [_row(t, sp, index[sp.name], sums, controls[t.latent], density, n_scored, s)
            for t, sp in zip(targets, specs, strict=True)]
    _steer(adapter, hook, dictionary, data, rows, s)
    control_rows = {str(c): _measures(sums[c], n_scored, density[c])
                    for c in sorted({c for cs in controls.values() for c in cs})}
    verdicts = [r["verdict"] for r in rows]
    return {
        "hook": hook, "songs": data.songs, "windows": len(data.windows),
        "scored_positions": int(n_scored.sum()), "selected_positions": data.n_selected,
        "tokens": s.tokens, "interval": {"level": 0.95, "method": "percentile bootstrap",
                                         "unit": "song", "resamples": s.rule.bootstrap},
        "rule": {"min_firing": s.rule.min_firing, "min_songs": s.rule.min_songs,
                 "min_controls": s.rule.min_controls, "n_controls": s.n_controls},
        "latents": rows, "controls": control_rows,
        "summary": {"tested": len(rows), "used": verdicts.count(USED),
                    "not_used": verdicts.count(NOT_USED),
                    "insufficient": verdicts.count(INSUFFICIENT), "songs": len(data.songs),
                    "windows": len(data.windows), "selected_positions": data.n_selected},
    }


def _measures(s: LatentSums, n_scored: np.ndarray, density: float) -> dict[str, Any]:
    """The label-free measures of one latent's ablation."""
    fire = float(s.n_fire.sum())
    return {"density": float(density), "firing_positions": int(fire),
            "firing_songs": int((s.n_fire > 0).sum()),
            "mean_activation": float(s.act_fire.sum() / fire) if fire else None,
            "delta_ce_all": field_means(s.dce_all, n_scored, s.fields),
            "delta_ce_fire": field_means(s.dce_fire, s.n_fire, s.fields),
            "kl_fire": field_means(s.kl_fire, s.n_fire, s.fields)}


def _row(t: Target, spec: LabelSpec, label: int, sums: dict[int, LatentSums], controls: list[int],
         density: np.ndarray, n_scored: np.ndarray, s: HookSettings) -> dict[str, Any]:
    mine = sums[t.latent]
    value = point(mine, spec, label)
    interval = bootstrap_interval(mine, spec, label, s.rule.bootstrap, s.seed + t.latent)
    effects = [point(sums[c], spec, label) for c in controls]
    finite = np.asarray([e for e in effects if np.isfinite(e)])
    measures = _measures(mine, n_scored, density[t.latent])
    fire = float(mine.n_fire.sum())
    direct = spec.codes is not None and fire > 0
    return {
        "latent": t.latent, "label": t.label, "when": t.when, "source": t.source,
        "effect_kind": effect_kind(spec), "effect": value if np.isfinite(value) else None,
        "ci": interval,
        "controls": {"latents": controls,
                     "effects": [e if np.isfinite(e) else None for e in effects],
                     "mean": float(finite.mean()) if len(finite) else None,
                     "sd": float(finite.std(ddof=1)) if len(finite) > 1 else None,
                     "max": float(finite.max()) if len(finite) else None},
        "verdict": verdict(value, interval, effects, int(fire), measures["firing_songs"], s.rule),
        "p_label_clean": float(mine.p_clean[:, label].sum() / fire) if direct else None,
        "dp_label": float(mine.dp[:, label].sum() / fire) if direct else None,
        "relative_drop": (float(-mine.dp[:, label].sum() / mine.p_clean[:, label].sum())
                          if direct and mine.p_clean[:, label].sum() > 0 else None),
        **measures, "steering": None,
    }


def _steer(adapter: ModelAdapter, hook: str, dictionary: Any, data: EvalData, rows: list[dict[str, Any]],
           s: HookSettings) -> None:
    """Add ``steering`` to the first ``steer_latents`` rows with a measurable label."""
    if not s.steer_latents or not s.alphas or not s.steer.seeds or not s.steer.steps:
        return
    try:
        vocabulary = adapter.event_vocabulary()
    except NotImplementedError:  # no labels to measure generated tokens by
        return
    chosen = [r for r in rows if r["label"] and measurable(r["label"], vocabulary)
              and r["mean_activation"]][: s.steer_latents]
    if not chosen:
        return
    prompts = make_prompts(data, s.steer)
    if not prompts:
        return
    baseline = generate_all(adapter, prompts, s.steer)
    for r in chosen:
        alphas = [(m, m * r["mean_activation"]) for m in s.alphas]
        r["steering"] = steer_latent(adapter, hook, dictionary.W_dec[r["latent"]], r["label"],
                                     alphas, prompts, baseline, s.steer)
