"""Outputs of the ``feature_token`` analyzer: ``<hook>.nc`` (latent x label), the per-hook
CSV tables, the manifest summary and ``summary.md``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .attributes import BEAT_NOTE

if TYPE_CHECKING:
    from .feature_token import FeatureTokenConfig
    from .labelspace import LabelSpace

def best_by_time(r: dict[str, np.ndarray], labels: LabelSpace) -> dict[str, np.ndarray]:
    """Per unit: best label and score among the labels at t and among those at t+1."""
    out = {}
    when = np.asarray(labels.when)
    names = np.asarray(labels.names, object)
    for tag, key in (("t", "t"), ("t+1", "t1")):
        rows = np.flatnonzero(when == tag)
        if not len(rows):
            continue
        sub = np.where(np.isfinite(r["score"][rows]), r["score"][rows], -np.inf)
        best = np.argmax(sub, axis=0)
        score = sub[best, np.arange(sub.shape[1])]
        alive = r["density"] > 0
        out[f"best_label_{key}"] = np.where(alive & np.isfinite(score), names[rows[best]], "")
        out[f"best_score_{key}"] = np.where(alive & np.isfinite(score), score, np.nan)
    return out


_DOCS = {"firing_rate": "fraction of the label's tokens on which the unit is > 0",
         "mean_activation": "mean activation on the label's tokens",
         "auroc": "AUROC of the activation for label vs every other selected token (binned)",
         "score": "AUROC, two-sided (max(AUROC, 1 - AUROC)) for signed units",
         "precision_mass": "share of the unit's positive activation mass on the label's tokens",
         "precision_fire": "share of the unit's firings on the label's tokens",
         "best_score": "highest score over labels", "best_score_error":
         "bound on |binned - exact| AUROC of the best label",
         "monosemanticity": "share of the unit's positive activation mass on its best label",
         "density": "fraction of the selected tokens on which the unit is > 0",
         "song_share_max": "largest single song's share of the unit's positive activation mass",
         "songs_effective": "effective number of songs of the unit's positive mass: "
                            "(sum of song masses)^2 / sum of squared song masses"}


def to_dataset(labels: LabelSpace, results: dict[str, dict[str, np.ndarray]],
               analysis: dict[str, Any], attrs: dict[str, Any]) -> Any:
    """The xarray Dataset written to ``<hook>.nc``: latent x label statistics, the raw
    dimensions (``raw_``), the controls' best score per label (``control_<group>_*``) and
    the per-latent findings."""
    import xarray as xr

    coords: dict[str, Any] = {"label": labels.names, "attribute": ("label", labels.attribute),
                              "value": ("label", labels.value), "when": ("label", labels.when),
                              "label_count": ("label", labels.counts)}
    data: dict[str, Any] = {}
    for kind, prefix in (("latent", ""), ("neuron", "raw_")):
        if kind not in results:
            continue
        r = results[kind]
        coords[kind] = np.arange(len(r["density"]))
        keys = ["firing_rate", "mean_activation", "auroc", "score", "precision_mass", "precision_fire"]
        for key in keys:
            data[prefix + key] = ((kind, "label"), r[key].T.astype(np.float32))
        for key in ("best_label", "best_attribute", "best_value"):
            data[prefix + key] = (kind, r[key].astype(str))
        for key in ("best_score", "best_score_error", "monosemanticity", "density"):
            data[prefix + key] = (kind, r[key].astype(np.float32))
        if kind == "latent":
            for key in ("song_share_max", "songs_effective"):
                if key in r:
                    data[key] = (kind, r[key].astype(np.float32))
            for key, value in best_by_time(r, labels).items():
                data[key] = ("latent", value.astype(str if key.startswith("best_label") else np.float32))
    for group, c in analysis["controls"].items():
        data[f"control_{group}_score"] = ("label", c["score"].astype(np.float32))
        data[f"control_{group}_unit"] = ("label", c["unit"].astype(str))
    found = analysis.get("found")
    if found is not None:
        names = np.asarray(labels.names, object)
        data["finding"] = ("latent", found["finding"].astype(np.int8))
        data["finding_label"] = ("latent", np.where(found["finding"],
                                                    names[np.maximum(found["finding_label"], 0)], "").astype(str))
        data["finding_margin"] = ("latent", found["margin"].astype(np.float32))
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    for name in ds.data_vars:
        key = str(name).removeprefix("raw_")
        if key in _DOCS:
            ds[name].attrs["long_name"] = _DOCS[key]
    if "finding" in ds:
        ds["finding"].attrs["long_name"] = ("1 when the latent beats every control for its label "
                                            "(see attrs: min_auroc, margin, min_precision)")
    return ds


def write_summary_csv(path: Path, r: dict[str, np.ndarray], labels: LabelSpace,
                      found: dict[str, np.ndarray] | None) -> None:
    """Latents sorted by best score (dead latents last), with their best label at t and t+1."""
    order = np.argsort(-np.nan_to_num(r["best_score"], nan=-1.0), kind="stable")
    by_time = best_by_time(r, labels)
    names = np.asarray(labels.names, object)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["latent", "best_label", "best_score", "best_score_error", "monosemanticity",
                    "density", "firing_rate_on_best", "mean_activation_on_best", "best_label_t",
                    "best_score_t", "best_label_t1", "best_score_t1", "finding", "finding_label",
                    "finding_margin"])
        for u in order:
            b = r["best"][u]
            f = found is not None and bool(found["finding"][u])
            w.writerow([int(u), r["best_label"][u], _f(r["best_score"][u]),
                        _f(r["best_score_error"][u]), _f(r["monosemanticity"][u]),
                        _f(r["density"][u]), _f(r["firing_rate"][b, u]),
                        _f(r["mean_activation"][b, u]),
                        by_time.get("best_label_t", [""] * (u + 1))[u],
                        _f(by_time.get("best_score_t", np.full(u + 1, np.nan))[u]),
                        by_time.get("best_label_t1", [""] * (u + 1))[u],
                        _f(by_time.get("best_score_t1", np.full(u + 1, np.nan))[u]),
                        int(f), names[found["finding_label"][u]] if f else "",
                        _f(found["margin"][u]) if f else ""])
    tmp.replace(path)


def write_findings_csv(path: Path, rows: list[dict[str, Any]], groups: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["latent", "label", "when", "auroc", "precision_mass", "precision_fire",
                    "density", "songs_effective", "song_share_max", "margin", "strongest_control",
                    *[f"{g}_{k}" for g in groups for k in ("score", "unit")]])
        for r in rows:
            w.writerow([r["latent"], r["label"], r["when"], _f(r["auroc"]), _f(r["precision_mass"]),
                        _f(r["precision_fire"]), _f(r["density"]), _f(r.get("songs_effective")),
                        _f(r.get("song_share_max")), _f(r["margin"]),
                        r["strongest_control"],
                        *[x for g in groups for x in (_f(r["controls"].get(g, {}).get("score", np.nan)),
                                                      r["controls"].get(g, {}).get("unit", ""))]])
    tmp.replace(path)


def _f(x: float) -> str:
    return "" if x is None or not np.isfinite(x) else f"{float(x):.4g}"


def hook_summary(r: dict[str, dict[str, np.ndarray]], analysis: dict[str, Any],
                 n: int = 5) -> dict[str, Any]:
    """Counts of latents passing min_auroc (and of each control group), the findings (by
    time), the null and the ``n`` strongest findings."""
    lat = r.get("latent", r["neuron"])
    rows = analysis["rows"]
    return {
        "latents": len(lat["density"]), "alive": int((lat["density"] > 0).sum()),
        "passing_min_auroc": analysis.get("passing_min_auroc", {}),
        "findings": len(rows),
        "findings_t": sum(r_["when"] == "t" for r_ in rows),
        "findings_t1": sum(r_["when"] == "t+1" for r_ in rows),
        "few_songs": int(np.sum(analysis["found"]["few_songs"]))
        if analysis.get("found") is not None and "few_songs" in analysis["found"] else 0,
        "null": analysis.get("null"),
        "top": [{k: f[k] for k in ("latent", "label", "when", "auroc", "margin", "strongest_control")}
                for f in rows[:n]],
    }


def summary_markdown(per_hook: dict[str, dict[str, Any]], findings: dict[str, list[dict[str, Any]]],
                     n_tokens: int, cfg: FeatureTokenConfig) -> str:
    lines = ["# feature_token", "",
             f"{n_tokens} selected tokens ({cfg.tokens}). A finding: AUROC >= {cfg.min_auroc}, "
             f"at least {cfg.min_precision:.0%} of the latent's activation mass on the label, and a "
             f"margin >= {cfg.margin} over the best control for that label (raw dimensions "
             "two-sided, input-embedding rows, density-matched random directions, a random-init "
             f"dictionary), and the latent's activation mass spread over at least {cfg.min_songs:g} "
             "effective songs (a latent of one piece reaches every label of that piece). Labels `next.*` are at t+1 (what the model predicts); the others at t "
             f"(the token's own input). Note: {BEAT_NOTE}.", ""]
    for hook, s in per_hook.items():
        null = s.get("null") or {}
        passing = s.get("passing_min_auroc", {})
        lines += [f"## {hook}", "",
                  f"{s['alive']}/{s['latents']} latents alive. Units with best AUROC >= "
                  f"{cfg.min_auroc}: " + ", ".join(f"{g} {c}" for g, c in passing.items()) + ".",
                  f"Under the null (labels rolled within shards, {len(null.get('null_counts', []))} "
                  f"sets): {null.get('null_counts')} latents (p = {null.get('p')})." if null else "",
                  f"**{s['findings']} findings** ({s['findings_t']} at t, {s['findings_t1']} at t+1)."
                  + (f" Left out as latents of too few songs: {s['few_songs']}."
                     if s.get("few_songs") else ""),
                  "", "| latent | label | when | AUROC | margin | strongest control | precision "
                  "| songs (effective) |",
                  "|---:|---|---|---:|---:|---|---:|---:|"]
        for f in findings.get(hook, [])[: cfg.top_n]:
            c = f["controls"].get(f["strongest_control"], {})
            lines.append(f"| {f['latent']} | {f['label']} | {f['when']} | {_f(f['auroc'])} | "
                         f"{_f(f['margin'])} | {f['strongest_control']} {_f(c.get('score'))} "
                         f"({c.get('unit', '')}) | {_f(f['precision_mass'])} | "
                         f"{_f(f.get('songs_effective'))} |")
        lines.append("")
    return "\n".join(lines)


