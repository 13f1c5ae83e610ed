"""Which latents count as findings: beating every control for their label, with a null.

For every label l and control group g (see :mod:`.controls`), the control score C_g(l)
is the best score any unit of g reaches for l (two-sided for signed units). A latent i
is a **finding** for label l when

* its AUROC for l is at least ``min_auroc``,
* at least ``min_precision`` of its positive activation mass falls on tokens with l,
* its AUROC exceeds every control score C_g(l) by at least ``margin``,
* and it is not the latent of a few songs: its positive activation mass spreads over at
  least ``min_songs`` effective songs ((sum of song masses)^2 / sum of squared song
  masses; a latent of one piece can reach any label of that piece, e.g. its key).

Of the labels that qualify, the one with the largest margin is reported. A label at t
is one the token carries in its own input; a label at t+1 (``next.*``) is one the model
predicts. The **null** for the count: the labels of each shard rolled by a random share
of its tokens (other songs' labels, the same label counts; see ``LabelSpace.chunks``)
give the number of latents whose best AUROC reaches ``min_auroc`` by chance, to set
against the real count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FindingRule:
    """The thresholds of a finding."""

    min_auroc: float = 0.9
    margin: float = 0.02
    min_precision: float = 0.5
    min_songs: float = 5.0


def control_scores(groups: dict[str, dict[str, np.ndarray]], unit_names: dict[str, list[str]],
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Per control group: ``score`` (labels,) best score for each label, ``unit`` its unit name."""
    out = {}
    for name, r in groups.items():
        score = np.where(np.isfinite(r["score"]), r["score"], -np.inf)
        if score.shape[1] == 0:
            continue
        best = np.argmax(score, axis=1)
        names = np.asarray(unit_names.get(name) or [str(i) for i in range(score.shape[1])], object)
        out[name] = {"score": np.take_along_axis(score, best[:, None], 1)[:, 0], "unit": names[best]}
    return out


def find(latent: dict[str, np.ndarray], controls: dict[str, dict[str, np.ndarray]],
         rule: FindingRule) -> dict[str, np.ndarray]:
    """Per latent: ``finding`` (bool), ``finding_label`` (label index, -1), ``margin`` over the
    strongest control for that label, ``control`` (the group of that control) and
    ``few_songs`` (it would be a finding but for its spread over songs)."""
    auroc = np.where(np.isfinite(latent["auroc"]), latent["auroc"], -np.inf)
    n_labels, n_units = auroc.shape
    if controls:
        stacked = np.stack([c["score"] for c in controls.values()])  # (groups, labels)
        strongest = stacked.max(axis=0)
        which = np.asarray(list(controls), object)[stacked.argmax(axis=0)]
    else:
        strongest = np.full(n_labels, -np.inf)
        which = np.full(n_labels, "", object)
    margin = auroc - strongest[:, None]
    mass = np.nan_to_num(latent["precision_mass"], nan=0.0)
    ok = (auroc >= rule.min_auroc) & (mass >= rule.min_precision) & (margin >= rule.margin)
    few_songs = np.zeros(n_units, bool)
    if "songs_effective" in latent:
        spread = np.nan_to_num(latent["songs_effective"], nan=0.0) >= rule.min_songs
        few_songs = ok.any(axis=0) & ~spread if n_labels else few_songs
        ok &= spread[None, :]
    masked = np.where(ok, margin, -np.inf)
    label = np.argmax(masked, axis=0) if n_labels else np.zeros(n_units, np.int64)
    found = ok.any(axis=0) if n_labels else np.zeros(n_units, bool)
    units = np.arange(n_units)
    return {
        "finding": found,
        "finding_label": np.where(found, label, -1),
        "margin": np.where(found, margin[label, units] if n_labels else 0.0, np.nan),
        "control": np.where(found, which[label] if n_labels else "", ""),
        "few_songs": few_songs,
    }


def null_summary(observed_best: np.ndarray, null_best: np.ndarray, rule: FindingRule) -> dict[str, Any]:
    """The count of latents with best AUROC >= ``min_auroc`` against the same count under
    each null label set; ``p`` is the share of null counts at least as large (with the
    observed one counted, so never below 1 / (sets + 1))."""
    observed = int(np.sum(np.nan_to_num(observed_best, nan=-1.0) >= rule.min_auroc))
    counts = [int(np.sum(np.nan_to_num(b, nan=-1.0) >= rule.min_auroc)) for b in null_best]
    p = (1 + sum(c >= observed for c in counts)) / (1 + len(counts)) if counts else None
    return {"observed": observed, "null_counts": counts,
            "null_mean": float(np.mean(counts)) if counts else None,
            "null_max": max(counts) if counts else None, "p": p}


def findings_rows(latent: dict[str, np.ndarray], found: dict[str, np.ndarray],
                  controls: dict[str, dict[str, np.ndarray]], names: list[str],
                  when: list[str]) -> list[dict[str, Any]]:
    """One row per finding, strongest margin first."""
    rows = []
    for u in np.flatnonzero(found["finding"]):
        lab = int(found["finding_label"][u])
        row = {
            "latent": int(u), "label": names[lab], "when": when[lab],
            "auroc": float(latent["auroc"][lab, u]),
            "auroc_error": float(latent["best_score_error"][u]) if np.isfinite(
                latent["best_score_error"][u]) else None,
            "precision_mass": float(latent["precision_mass"][lab, u]),
            "precision_fire": float(latent["precision_fire"][lab, u]),
            "firing_rate": float(latent["firing_rate"][lab, u]),
            "density": float(latent["density"][u]),
            **({"songs_effective": float(latent["songs_effective"][u]),
                "song_share_max": float(latent["song_share_max"][u])}
               if "songs_effective" in latent else {}),
            "margin": float(found["margin"][u]), "strongest_control": str(found["control"][u]),
            "controls": {g: {"score": float(c["score"][lab]), "unit": str(c["unit"][lab])}
                         for g, c in controls.items()},
        }
        rows.append(row)
    rows.sort(key=lambda r: (-r["margin"], -r["auroc"]))
    return rows
