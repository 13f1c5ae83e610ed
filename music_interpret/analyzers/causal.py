"""``causal``: does MMT use a latent for what ``feature_token`` says it codes? Ablation
against density-matched controls, with bootstrap intervals, and steering.

**Latents tested.** Per hook, the findings of ``feature_token`` (``analyze/feature_token/
findings.json``: latent, label, when; strongest margin first, at most ``max_latents``).
Without that file, the ``fallback_top`` latents with the best AUROC in
``feature_token/<hook>.nc`` (with their best label), else the ``fallback_top`` latents
with the most activation mass on the evaluation data (no label).

**Data.** Model windows of the dictionary's held-out songs (the train stage's split:
``training.holdout_songs`` in its ``config.json``, or recomputed from the seed and
fraction there), in order, up to ``max_windows`` windows / ``max_tokens`` tokens. A
position t is *scored* when the window owns token t and token t+1 is real; it is a
*firing* position of latent i when it is scored, of the selected kind (``tokens``: note
tokens by default, as in ``feature_token``) and f_i(x_t) > 0 (see :mod:`.causal_data`).

**Ablation** of latent i: x -> x - f_i(x) W_dec[i] at the hook, at every eligible token
(real tokens; note tokens only for a dictionary trained on note tokens). Only latent i's
decoded contribution is removed; the reconstruction of the other latents and the SAE's
error term stay. Measured per field (type, beat, position, pitch, duration, instrument)
and ``total``: ΔCE (nats, ablated - clean) of the next-token cross-entropy over all
scored positions (``delta_ce_all``) and over the firing positions (``delta_ce_fire``);
``kl_fire``: the mean KL(p_clean || p_ablated) of each field's predicted distribution at
the firing positions; and for a label MMT predicts directly (``next.pitch``,
``next.pitch_class`` (summed probability of the pitches of the class), ``next.octave``,
``next.position``, ``next.duration``, ``next.instrument``, ``next.event_type``) the mean
clean probability of the label's value at the firing positions (``p_label_clean``), its
change (``dp_label``) and the share of it removed (``relative_drop = -dp_label /
p_label_clean``).

**Effect** E(j, l) of ablating latent j, for the label l of the finding:

* ``label_prob_drop`` (l predicted directly): E = -dp_label, the mean drop of the
  predicted probability of l's value at j's firing positions;
* ``delta_ce_fire:<field>`` (every other label: labels at t, derived labels such as
  ``next.key``): E = the mean ΔCE of l's field at j's firing positions (``pitch`` for
  pitch, theory and voice labels, ``position`` for position and metric strength, ``beat``
  for beat labels, ``type`` for event types, ``total`` for a latent without a label).

Each mean is a ratio of sums over songs: Σ_songs Σ_positions / Σ_songs #positions.

**Controls.** For finding i, the ``n_controls`` latents of the same dictionary nearest
to i in log10 firing density (on the selected positions of the evaluation data; ties in a
seeded random order) among those that are not findings (nor tested) and fire on at least
``min_firing`` positions. E(c, l) is computed for each control c with the finding's label
l at c's own firing positions. Reported: their mean, standard deviation and maximum.

**Interval.** Percentile bootstrap 95% interval of E(i, l): ``bootstrap`` resamples of
the evaluated held-out **songs** with replacement (all positions of a song together),
E recomputed as a ratio of sums on each resample.

**Verdict.** ``used`` when E(i, l) > max_c E(c, l) over every control and the interval's
lower bound is > 0; ``insufficient`` when i fires on fewer than ``min_firing`` positions,
in fewer than ``min_songs`` songs, or fewer than ``min_controls`` controls could be
measured; ``not used`` otherwise.

**Steering** (:mod:`.causal_steer`, the first ``steer_latents`` tested latents whose
label is an attribute of single tokens): continuations of ``steer_prompts`` held-out
prompts x ``steer_seeds`` seeds with alpha W_dec[i] added at the hook at every position,
alpha = each of ``alphas`` times the latent's mean activation at its firing positions,
against the same seeds unsteered; the shift of the share of generated tokens carrying the
label's value, with a bootstrap interval over (prompt, seed) pairs. Reported, not part of
the verdict.

Outputs in ``analyze/causal/``: ``<hook>.json`` (everything, controls included),
``<hook>_causal.csv`` (one row per tested latent) and ``summary.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..doors import SPLITS
from ..errors import UserError
from ..interfaces import Analyzer, ModelAdapter
from ..jsonio import write_json_atomic
from .causal_report import hook_row, summary_markdown, write_csv
from .causal_run import HookSettings, Target, causal_hook

if TYPE_CHECKING:
    from .context import AnalysisContext


@dataclass
class CausalConfig:
    """Options of ``causal`` (definitions in the module doc)."""

    max_latents: int = 32
    fallback_top: int = 8
    tokens: Literal["notes", "all"] | None = None  # None: findings.json's, else notes
    max_windows: int = 32
    max_tokens: int = 16_384
    batch_size: int = 8
    pass_tokens: int = 16_384
    n_controls: int = 8
    min_firing: int = 20
    min_songs: int = 5
    min_controls: int = 3
    bootstrap: int = 1000
    steer_latents: int = 4
    steer_prompts: int = 4
    steer_seeds: int = 2
    steer_prompt_notes: int = 16
    steer_steps: int = 32
    alphas: list[float] = field(default_factory=lambda: [2.0, 8.0])
    temperature: float = 1.0
    filter_thres: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        for key in ("max_latents", "fallback_top", "max_windows", "max_tokens", "batch_size",
                    "pass_tokens", "steer_prompt_notes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("n_controls", "min_firing", "min_songs", "min_controls", "bootstrap",
                    "steer_latents", "steer_prompts", "steer_seeds", "steer_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.tokens not in (None, "notes", "all"):
            raise ValueError(f"tokens must be notes or all, got {self.tokens!r}")
        if not self.temperature > 0 or not 0 <= self.filter_thres < 1:
            raise ValueError("temperature must be > 0 and filter_thres in [0, 1)")


def read_findings(path: Path) -> dict[str, Any] | None:
    """``findings.json`` of ``feature_token``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def targets_from_findings(findings: dict[str, Any], hook: str) -> tuple[list[Target], set[int]] | None:
    """The findings of ``hook`` (as listed) and every finding latent; None without the hook."""
    entry = (findings.get("hooks") or {}).get(hook)
    if not isinstance(entry, dict):
        return None
    rows = entry.get("findings") or []
    targets = [Target(int(r["latent"]), str(r["label"]), str(r.get("when", "")), "findings")
               for r in rows]
    return targets, {t.latent for t in targets}


def targets_from_nc(path: Path, n: int) -> list[Target] | None:
    """The ``n`` latents with the best AUROC in ``feature_token/<hook>.nc`` and their labels."""
    if not path.is_file():
        return None
    import xarray as xr

    from .attributes import ATTRIBUTES

    with xr.open_dataset(path) as ds:
        if "best_score" not in ds or "best_label" not in ds:
            return None
        score = np.nan_to_num(ds["best_score"].values.astype(float), nan=-1.0)
        labels = ds["best_label"].values.astype(str)
    out = []
    for i in np.argsort(-score, kind="stable")[:n]:
        if score[i] < 0 or not labels[i]:
            continue
        attribute = labels[i].partition("=")[0]
        when = ATTRIBUTES[attribute].when if attribute in ATTRIBUTES else ""
        out.append(Target(int(i), str(labels[i]), when, "feature_token.nc"))
    return out


class CausalAnalyzer(Analyzer):
    """Ablation and steering of each finding against density-matched controls."""

    name = "causal"
    description = ("Ablate each feature_token finding (remove its decoded contribution) against "
                   "density-matched control latents, with bootstrap intervals over held-out "
                   "songs, and steer generation along it.")
    Config = CausalConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        cfg: CausalConfig = self.config
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        adapter = ctx.adapter()
        if adapter is None or ctx.data_dir is None:
            raise UserError("causal: needs the pipeline's model and data")
        if type(adapter).patched_logits is ModelAdapter.patched_logits:
            reason = f"the {type(adapter).__name__} adapter offers no patched_logits"
            (out / "summary.md").write_text(f"# causal\n\nSkipped: {reason}.\n", encoding="utf-8")
            return {"skipped": reason}
        split = ctx.store.attrs.get("split")
        dataset = ctx.open_dataset(split if split in SPLITS else None)
        assert dataset is not None
        ft = out.parent / "feature_token"
        findings = read_findings(ft / "findings.json")
        tokens = cfg.tokens or ((findings or {}).get("rule") or {}).get("tokens") or "notes"
        seed = ctx.seed if cfg.seed is None else cfg.seed
        summary: dict[str, Any] = {"hooks": {}}
        rows: dict[str, list[dict[str, Any]]] = {}
        for hook in ctx.dictionaries:
            start = time.perf_counter()
            dictionary = ctx.load_dictionary(hook)
            found = targets_from_findings(findings, hook) if findings is not None else None
            if found is not None:
                (targets, finding_latents), source = found, "feature_token findings"
                targets = targets[: cfg.max_latents]
            else:
                targets, finding_latents = targets_from_nc(ft / f"{hook}.nc", cfg.fallback_top), set()
                source = ("feature_token best AUROC (no findings.json)" if targets is not None
                          else "activation mass (no feature_token output)")
            settings = HookSettings.from_config(cfg, tokens, seed)
            result = causal_hook(adapter, hook, dictionary, dataset, ctx.store.songs, targets,
                                 finding_latents, settings, progress=ctx.progress)
            result["dictionary"] = str(ctx.dictionaries[hook])
            result["summary"]["targets_from"] = source
            result["seconds"] = round(time.perf_counter() - start, 2)
            write_json_atomic(out / f"{hook}.json", result)
            write_csv(out / f"{hook}_causal.csv", result)
            rows[hook] = [hook_row(r) for r in result["latents"]]
            summary["hooks"][hook] = result["summary"]
        (out / "summary.md").write_text(summary_markdown(summary, rows, cfg), encoding="utf-8")
        return summary
