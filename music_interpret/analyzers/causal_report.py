"""Readable outputs of the ``causal`` analyzer: ``<hook>_causal.csv`` and ``summary.md``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = ("latent", "label", "when", "source", "effect_kind", "effect", "ci_lo", "ci_hi",
           "control_mean", "control_sd", "control_max", "n_controls", "verdict",
           "firing_positions", "firing_songs", "density", "mean_activation", "p_label_clean",
           "dp_label", "relative_drop", "delta_ce_fire_total", "delta_ce_all_total", "kl_fire_total")


def _f(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def hook_row(r: dict[str, Any]) -> dict[str, Any]:
    """The flat CSV row of one tested latent (steering: shift and interval per alpha)."""
    ci = r.get("ci") or [None, None]
    c = r["controls"]
    row: dict[str, Any] = {
        "latent": r["latent"], "label": r["label"], "when": r["when"], "source": r["source"],
        "effect_kind": r["effect_kind"], "effect": r["effect"], "ci_lo": ci[0], "ci_hi": ci[1],
        "control_mean": c["mean"], "control_sd": c["sd"], "control_max": c["max"],
        "n_controls": sum(e is not None for e in c["effects"]), "verdict": r["verdict"],
        "firing_positions": r["firing_positions"], "firing_songs": r["firing_songs"],
        "density": r["density"], "mean_activation": r["mean_activation"],
        "p_label_clean": r["p_label_clean"], "dp_label": r["dp_label"],
        "relative_drop": r.get("relative_drop"),
        "delta_ce_fire_total": r["delta_ce_fire"]["total"],
        "delta_ce_all_total": r["delta_ce_all"]["total"], "kl_fire_total": r["kl_fire"]["total"],
    }
    for s in r.get("steering") or []:
        tag = f"x{s['alpha_multiple']:g}"
        sci = s.get("ci") or [None, None]
        row[f"steer_shift_{tag}"] = s["shift"]
        row[f"steer_ci_lo_{tag}"] = sci[0]
        row[f"steer_ci_hi_{tag}"] = sci[1]
    return row


def write_csv(path: Path, result: dict[str, Any]) -> None:
    """One row per tested latent (columns :data:`COLUMNS`, then the steering columns)."""
    rows = [hook_row(r) for r in result.get("latents", [])]
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in COLUMNS))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*COLUMNS, *extra])
        for r in rows:
            w.writerow([_f(r.get(k)) for k in (*COLUMNS, *extra)])
    tmp.replace(path)


def summary_markdown(summary: dict[str, Any], rows: dict[str, list[dict[str, Any]]],
                     cfg: Any) -> str:
    """The ``summary.md`` of the analyzer: the rule, then one table per hook."""
    lines = [
        "# causal", "",
        "Each tested latent i is ablated alone (x -> x - f_i(x) W_dec[i] at the hook) on windows "
        "of the dictionary's held-out songs. Effect: the drop of the predicted probability of "
        "the label's value at i's firing positions (labels the model predicts directly, "
        "`ModelAdapter.label_target`; MMT: `next.pitch`, `next.pitch_class`, `next.octave`, "
        "`next.position`, `next.duration`, `next.instrument`, `next.event_type`), else the ΔCE "
        "(nats) of the label's field "
        f"there. Controls: the {cfg.n_controls} non-finding latents nearest in log firing "
        "density. Interval: percentile bootstrap 95% over held-out songs. **used**: effect "
        "above every control and interval above 0; **insufficient**: fewer than "
        f"{cfg.min_firing} firing positions, {cfg.min_songs} songs or {cfg.min_controls} "
        "controls.", ""]
    for hook, s in summary.get("hooks", {}).items():
        lines += [f"## {hook}", ""]
        if s.get("skipped"):
            lines += [f"Skipped: {s['skipped']}.", ""]
            continue
        lines += [f"Latents from {s.get('targets_from', '?')}. "
                  f"{s['tested']} latents tested on {s['songs']} held-out songs "
                  f"({s['windows']} windows, {s['selected_positions']} selected positions): "
                  f"**{s['used']} used**, {s['not_used']} not used, {s['insufficient']} "
                  "insufficient.", "",
                  "| latent | label | effect | 95% CI | controls mean ± sd (max) | verdict | "
                  "steering shift |", "|---:|---|---:|---|---|---|---|"]
        for r in rows.get(hook, []):
            steer = ", ".join(f"{k.removeprefix('steer_shift_')}: {_f(v)}" for k, v in r.items()
                              if k.startswith("steer_shift_"))
            ci = f"[{_f(r['ci_lo'])}, {_f(r['ci_hi'])}]" if r["ci_lo"] is not None else ""
            lines.append(f"| {r['latent']} | {r['label'] or '-'} | {_f(r['effect'])} "
                         f"({r['effect_kind']}) | {ci} | {_f(r['control_mean'])} ± "
                         f"{_f(r['control_sd'])} ({_f(r['control_max'])}) | {r['verdict']} | "
                         f"{steer} |")
        lines.append("")
    return "\n".join(lines)
