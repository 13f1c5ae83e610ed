"""``feature_token``: which musical labels each latent codes for, and which of them survive controls.

For every unit u -- dictionary latent, and as controls the raw dimensions, projections
on the model's input-embedding rows, density-matched random directions and a
random-init dictionary (:mod:`.controls`) -- and every label l = ``attribute=value``
(:mod:`.attributes`, at t and at t+1), over the selected tokens (note tokens by default):

* ``firing_rate[u, l]``, ``mean_activation[u, l]`` on the label's tokens;
* ``auroc[u, l]`` of the activation for "token has label l" against every other
  selected token (streaming, exact for the binned values: :mod:`.unitstats`), and
  ``score`` (two-sided for the signed control units);
* ``precision_mass`` / ``precision_fire``: the share of the unit's positive activation
  mass / of its firings that falls on the label's tokens.

Per latent: its best label overall, at t and at t+1, and whether it is a **finding**
(:mod:`.findings`): AUROC >= ``min_auroc``, precision >= ``min_precision`` and a margin
>= ``margin`` over every control's best score for that label. A permutation null (labels
rolled within shards, ``null_shifts`` times) gives the count of latents reaching
``min_auroc`` by chance. Outputs per hook: ``<hook>.nc`` (xarray, latent x label, and
the controls' best score per label), ``<hook>_summary.csv``, ``<hook>_findings.csv`` and
``findings.json``, ``summary.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer
from ..jsonio import write_json_atomic
from .attributes import BEAT_NOTE, resolve_attributes
from .controls import (
    CONTROL_GROUPS,
    UnitGroup,
    embedding_group,
    neuron_group,
    random_group,
    random_sae_group,
)
from .feature_token_report import (
    hook_summary,
    summary_markdown,
    to_dataset,
    write_findings_csv,
    write_summary_csv,
)
from .findings import FindingRule, control_scores, find, findings_rows, null_summary
from .labelspace import TOKENS, LabelSpace, read_rows
from .unitstats import UnitStats

if TYPE_CHECKING:
    from ..interfaces import StoreReader
    from .context import AnalysisContext

CALIB_PIECES = 16
CALIB_PIECE_TOKENS = 1024
GOOD_SCORE = 0.9
MAX_BINS = 4096


@dataclass
class FeatureTokenConfig:
    """Options of ``feature_token``.

    ``tokens``: ``notes`` (note tokens only, the default) or ``all``. ``controls``: the
    control groups computed (all by default; ``embedding`` needs the pipeline's model).
    A finding needs AUROC >= ``min_auroc``, ``precision_mass`` >= ``min_precision``, a
    margin >= ``margin`` over every control and its mass spread over >= ``min_songs``
    effective songs. ``null_shifts``: permutation-null label sets.
    """

    attributes: list[str] = field(default_factory=list)  # empty: every known attribute
    tokens: Literal["notes", "all"] = "notes"
    max_tokens: int | None = None  # first tokens of the store (also capped by analyze.max_tokens)
    chunk_tokens: int = 4096
    bins: int = 256
    min_count: int = 20  # labels on fewer tokens (or on all but fewer) are left out
    controls: list[str] = field(default_factory=lambda: list(CONTROL_GROUPS))
    min_auroc: float = 0.9
    margin: float = 0.02
    min_precision: float = 0.5
    min_songs: float = 5.0
    null_shifts: int = 8
    seed: int | None = None  # of the random controls and null shifts (default: the run's)
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
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        unknown = [c for c in self.controls if c not in CONTROL_GROUPS]
        if unknown:
            raise ValueError(f"controls: unknown {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(CONTROL_GROUPS)})")
        if not 0.5 <= self.min_auroc <= 1 or not 0 <= self.min_precision <= 1 or self.margin < 0:
            raise ValueError("min_auroc must be in [0.5, 1], min_precision in [0, 1], margin >= 0")
        if self.min_songs < 1:
            raise ValueError(f"min_songs must be at least 1, got {self.min_songs}")
        if self.null_shifts < 0:
            raise ValueError(f"null_shifts must be >= 0, got {self.null_shifts}")

    @property
    def rule(self) -> FindingRule:
        return FindingRule(self.min_auroc, self.margin, self.min_precision, self.min_songs)


# -- the streaming passes ---------------------------------------------------------------


def one_hot(lab: np.ndarray, n_labels: int, device: Any = "cpu") -> Any:
    """(n, labels) float32 tensor on ``device`` with a 1 at every kept label of every token."""
    import torch

    rows, cols = np.nonzero(lab >= 0)
    y = torch.zeros(len(lab), n_labels, device=device)
    y[torch.from_numpy(rows).to(device), torch.from_numpy(lab[rows, cols]).to(device)] = 1.0
    return y


@dataclass
class Units:
    """One group of units and its running statistics."""

    group: UnitGroup
    stats: UnitStats

    def values(self, x: Any) -> Any:
        return self.group.encode(x).float() if self.group.encode is not None else x


@dataclass
class LatentSource:
    """The dictionary to analyse: ``encode`` (float32 (n, d_model) -> (n, d_sae), on the
    analysis device), its size, and its top-k (None for ReLU dictionaries)."""

    encode: Callable[[Any], Any]
    d_sae: int
    k: int | None = None


def feature_token_stats(info: StoreReader, hook: str, latents: LatentSource | Callable[[Any], Any] | None,
                        d_sae: int | None, cfg: FeatureTokenConfig, max_tokens: int | None = None,
                        progress: Callable[..., Any] | None = None, *,
                        embeddings: tuple[list[str], Any] | None = None, seed: int = 0,
                        meters: dict[int, Any] | None = None, device: Any = "cpu",
                        ) -> tuple[LabelSpace, dict[str, dict[str, np.ndarray]]]:
    """Label statistics of the latents and of every control group of ``hook``, computed on
    ``device`` (activations read from the store move there once per chunk; the labels are
    one-hot there; statistics stay there until the end).

    Returns the labels and, per group (``latent``, ``neuron``, ``embedding``, ``random``,
    ``random_sae`` as configured and available), :meth:`UnitStats.results` plus
    ``unit_names``; the ``latent`` entry also holds ``null_best`` (null sets, latents).
    """
    import torch

    if latents is not None and not isinstance(latents, LatentSource):
        latents = LatentSource(latents, int(d_sae or 0))
    attributes = resolve_attributes(cfg.attributes, "feature_token.attributes")
    labels = LabelSpace.scan(info, attributes, max_tokens, cfg.min_count, cfg.tokens, meters)
    try:
        if labels.n_tokens == 0 or len(labels) == 0:
            raise UserError(f"feature_token: no value of {', '.join(attributes)} occurs on at "
                            f"least min_count={cfg.min_count} of the {labels.n_tokens} selected "
                            f"({cfg.tokens}) tokens of {info.path}")
        rng = np.random.default_rng(seed)
        shifts = list(rng.uniform(0.25, 0.75, cfg.null_shifts)) if latents is not None else []
        with info.blocks(hook) as reader, torch.no_grad():
            # the calibration sample does not depend on the chunk size; it is encoded in
            # pieces of at most chunk_tokens tokens
            runs = [read_rows(reader, shard, rows)
                    for shard, rows in labels.sample(CALIB_PIECES, CALIB_PIECE_TOKENS)]
            pieces = [torch.from_numpy(np.ascontiguousarray(r[s: s + cfg.chunk_tokens])).to(device)
                      for r in runs for s in range(0, len(r), cfg.chunk_tokens)]
            groups = _groups(info, cfg, latents, pieces, embeddings, seed)
            units = {g.name: Units(g, UnitStats(g.n_units, len(labels), cfg.bins, sparse=g.sparse,
                                                two_sided=g.two_sided,
                                                n_null=len(shifts) if g.name == "latent" else 0,
                                                auroc_only=g.name not in ("latent", "neuron"),
                                                track_songs=g.name == "latent", device=device))
                     for g in groups if g.n_units > 0}
            for u in units.values():
                u.stats.calibrate(u.values(p) for p in pieces)
            n_chunks = labels.n_chunks(cfg.chunk_tokens)
            bar = progress(total=2 * n_chunks, desc=f"feature_token {hook}") if progress else None
            for pass_ in (1, 2):
                for chunk in labels.chunks(cfg.chunk_tokens, shifts if pass_ == 2 else ()):
                    x = torch.from_numpy(read_rows(reader, chunk.shard, chunk.rows)).to(device)
                    y = one_hot(chunk.labels, len(labels), device) if pass_ == 2 else None
                    null = [one_hot(z, len(labels), device) for z in chunk.shifted]
                    for u in units.values():
                        a = u.values(x)
                        if pass_ == 1:
                            u.stats.add_pass1(a)
                        else:
                            latent = u.group.name == "latent"
                            u.stats.add_pass2(y, a, null if latent else None,
                                              chunk.songs if latent else None)
                    if bar is not None:
                        bar.update(1)
                if pass_ == 1:
                    for u in units.values():
                        u.stats.finish_pass1()
            if bar is not None:
                bar.close()
        results = {}
        for name, u in units.items():
            r = u.stats.results(labels.names, labels.attribute, labels.value, labels.counts,
                                labels.n_tokens)
            r["unit_names"] = u.group.unit_names
            if name == "latent":
                r["null_best"] = u.stats.null_best(labels.counts, labels.n_tokens)
            results[name] = r
        return labels, results
    finally:
        labels.close()


def _groups(info: StoreReader, cfg: FeatureTokenConfig, latents: LatentSource | None, pieces: list[Any],
            embeddings: tuple[list[str], Any] | None, seed: int) -> list[UnitGroup]:
    """The latents, then the configured control groups that can be built here (from the
    calibration sample, given in ``pieces``)."""
    import torch

    groups = []
    densities = None
    sample = torch.cat(pieces) if pieces else torch.zeros(0, info.d_model)
    if latents is not None:
        groups.append(UnitGroup("latent", latents.d_sae, latents.encode, sparse=True,
                                two_sided=False, unit_names=[str(i) for i in range(latents.d_sae)]))
        fired = sum((latents.encode(p) > 0).double().sum(0) for p in pieces)
        densities = (fired / max(len(sample), 1)).cpu().numpy() if pieces else np.zeros(latents.d_sae)
    for name in cfg.controls:
        if name == "neuron":
            groups.append(neuron_group(info.d_model))
        elif name == "embedding" and embeddings is not None:
            groups.append(embedding_group(*embeddings, device=sample.device))
        elif name == "random" and densities is not None:
            groups.append(random_group(sample, densities, seed))
        elif name == "random_sae" and latents is not None:
            groups.append(random_sae_group(latents.d_sae, sample, seed, latents.k))
    return groups


def analyse_findings(labels: LabelSpace, results: dict[str, dict[str, np.ndarray]],
                     cfg: FeatureTokenConfig) -> dict[str, Any]:
    """Controls per label, the findings and the null for one hook."""
    rule = cfg.rule
    controls = control_scores({g: r for g, r in results.items() if g != "latent"},
                              {g: r["unit_names"] for g, r in results.items()})
    lat = results.get("latent")
    if lat is None:
        return {"controls": controls, "found": None, "rows": [], "null": None}
    found = find(lat, controls, rule)
    rows = findings_rows(lat, found, controls, labels.names, labels.when)
    null = null_summary(lat["best_score"], lat["null_best"], rule) if len(lat["null_best"]) else None
    passing = {g: int(np.sum(np.nan_to_num(r["best_score"], nan=-1.0) >= rule.min_auroc))
               for g, r in results.items()}
    return {"controls": controls, "found": found, "rows": rows, "null": null,
            "passing_min_auroc": passing}


class FeatureTokenAnalyzer(Analyzer):
    """Per latent: label statistics at t and t+1, controls, findings, a permutation null."""

    name = "feature_token"
    description = ("AUROC and precision of every latent per musical label (at t and t+1) against "
                   "controls; findings that beat every control, with a permutation null.")
    Config = FeatureTokenConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        cfg: FeatureTokenConfig = self.config
        caps = [m for m in (cfg.max_tokens, ctx.max_tokens) if m is not None]
        max_tokens = min(caps) if caps else None
        info = ctx.store
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        seed = ctx.seed if cfg.seed is None else cfg.seed
        embeddings = ctx.input_embeddings() if "embedding" in cfg.controls else None
        meters = ctx.song_meters()
        summary: dict[str, Any] = {}
        findings: dict[str, list[dict[str, Any]]] = {}
        n_tokens = 0
        for hook in ctx.dictionaries:
            dictionary = ctx.load_dictionary(hook)  # on ctx.device
            latents = LatentSource(dictionary.encode, int(dictionary.d_sae), dictionary.k)
            labels, results = feature_token_stats(
                info, hook, latents, None, cfg, max_tokens, ctx.progress,
                embeddings=embeddings, seed=seed, meters=meters, device=ctx.device)
            n_tokens = labels.n_tokens
            analysis = analyse_findings(labels, results, cfg)
            attrs = {"hook": hook, "store_id": info.store_id,
                     "store": str(info.path), "dictionary": str(ctx.dictionaries[hook]),
                     "n_tokens": labels.n_tokens, "tokens": cfg.tokens, "bins": cfg.bins,
                     "min_count": cfg.min_count, "min_auroc": cfg.min_auroc, "margin": cfg.margin,
                     "min_precision": cfg.min_precision, "controls": " ".join(analysis["controls"]),
                     "beat_note": BEAT_NOTE,
                     "auroc_method": "two-pass binned mid-rank sums (see best_score_error)"}
            ds = to_dataset(labels, results, analysis, attrs)
            tmp = out / f".{hook}.nc.tmp"
            ds.to_netcdf(tmp)
            tmp.replace(out / f"{hook}.nc")
            write_summary_csv(out / f"{hook}_summary.csv", results["latent"], labels, analysis["found"])
            write_findings_csv(out / f"{hook}_findings.csv", analysis["rows"], list(analysis["controls"]))
            summary[hook] = hook_summary(results, analysis)
            findings[hook] = analysis["rows"]
        write_json_atomic(out / "findings.json", {
            "rule": {"min_auroc": cfg.min_auroc, "margin": cfg.margin, "min_precision": cfg.min_precision,
                     "tokens": cfg.tokens, "controls": cfg.controls},
            "hooks": {h: {"summary": summary[h], "findings": findings[h]} for h in summary}})
        text = summary_markdown(summary, findings, n_tokens, cfg)
        (out / "summary.md").write_text(text, encoding="utf-8")
        return {"tokens": n_tokens, "hooks": summary}
