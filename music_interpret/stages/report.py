"""The ``report`` stage: a static, offline HTML report of a run.

Layout of ``reports/<run>/report/``::

    index.html                  run summary, dictionaries, probes, sortable latent tables
    assets/                     density histograms, probe plot
    latents/<hook>/<i>.html     one page per selected latent (+ its piano roll, MIDI, text)

Everything it shows is read from the other stages' outputs; a section whose source is
missing (no analyze stage, no probe, ...) is left out. Links are relative, so the
folder can be zipped and moved.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..interfaces import Stage
from . import report_html as H
from .report_data import (  # noqa: F401 - _hook_data re-exported (tests)
    LATENT_COLUMNS,
    HookData,
    _causal_rows,
    _hook_data,
    _hook_names,
    _latent_value,
    _live,
    _pick_pages,
    _ranking,
    _read_json,
    _stage_dir,
)
from .report_pages import _density_png, _latent_page

if TYPE_CHECKING:
    from ..context import StageContext


@dataclass
class ReportConfig:
    """Options of ``report``."""

    title: str = ""
    max_latent_pages: int = 300
    sample_rest: int = 50
    top_labels: int = 12

    def __post_init__(self) -> None:
        for name in ("max_latent_pages", "sample_rest", "top_labels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


class ReportStage(Stage):
    """Write the run's HTML report."""

    name = "report"
    description = "Static offline HTML report: run summary, metrics, probes, latent pages."
    Config = ReportConfig

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: ReportConfig = self.config
        out = Path(ctx.work_dir)
        for sub in ("assets", "latents"):
            shutil.rmtree(out / sub, ignore_errors=True)
            (out / sub).mkdir(parents=True)
        train = _stage_dir(ctx, "train")
        analyze = _stage_dir(ctx, "analyze")
        hooks = [_hook_data(h, train, analyze) for h in _hook_names(train, analyze)]
        title = cfg.title or f"music-interpret report: {ctx.pipeline.header.run}"
        chosen = {d.hook: _pick_pages(d, cfg.max_latent_pages, cfg.sample_rest, ctx.seed)
                  for d in hooks}
        findings = _read_json(analyze / "feature_token" / "findings.json") if analyze else {}
        causal = {d.hook: _causal_rows(analyze, d.hook) for d in hooks}
        body = [_findings_section(findings, chosen, causal), _overview_section(hooks, chosen)]
        for data in hooks:
            body.append(_dictionary_section(data, out, chosen[data.hook]))
            for latent in chosen[data.hook]:
                _latent_page(data, latent, out, cfg.top_labels, title)
        body += [_probe_section(analyze, out), *_analyzer_sections(analyze, out),
                 _model_data_section(ctx), _run_section(ctx)]
        pages = sum(len(c) for c in chosen.values())
        nav = " ".join(f'<a href="#dict-{H.esc(d.hook)}">{H.esc(d.hook)}</a>' for d in hooks)
        (out / "index.html").write_text(H.page(title, "\n".join(b for b in body if b), nav=nav))
        return {"hooks": [d.hook for d in hooks], "latent_pages": pages,
                "index": str(Path(ctx.out_dir) / "index.html")}


# -- index sections -----------------------------------------------------------------------


def _causal_cell(r: dict[str, Any] | None) -> str:
    """``used: 0.031 [0.012, 0.05] (controls <= 0.004)`` or n/a."""
    if not r:
        return "not tested"
    ci = r.get("ci") or [None, None]
    controls = r.get("controls", {})
    return (f"{r.get('verdict', '?')}: {_fmt(r.get('effect'))} [{_fmt(ci[0])}, {_fmt(ci[1])}] "
            f"(controls max {_fmt(controls.get('max'))})")


def _steer_cell(r: dict[str, Any] | None) -> str:
    """The steering shift of the strongest alpha with its interval, or ''."""
    steering = (r or {}).get("steering") or []
    if not steering:
        return ""
    s = max(steering, key=lambda e: e.get("alpha_multiple", 0))
    ci = s.get("ci") or [None, None]
    return f"x{s.get('alpha_multiple', 0):g}: {_fmt(s.get('shift'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _findings_section(findings: dict[str, Any], pages: dict[str, list[int]],
                      causal: dict[str, dict[int, dict[str, Any]]] | None = None) -> str:
    """The latents that beat every control for their label, per hook, with the controls and,
    where the ``causal`` analyzer ran, the effect of ablating them and of steering with them."""
    causal = causal or {}
    hooks = findings.get("hooks", {}) if isinstance(findings, dict) else {}
    if not hooks:
        return ""
    rule = findings.get("rule", {})
    parts = [f"<p>A latent is a finding when its AUROC for a label is at least "
             f"{rule.get('min_auroc')}, at least {_pct(rule.get('min_precision'))} of its "
             f"activation mass falls on the label's tokens, and its AUROC beats every control "
             f"for that label by at least {rule.get('margin')}: the raw dimensions (two-sided), "
             "projections on the model's input-embedding rows, density-matched random directions "
             "and a random-init dictionary of the same size. Labels <code>next.*</code> are at "
             "t+1, what the model predicts; the others at t, the token's own input "
             f"({H.esc(rule.get('tokens', ''))} tokens). Where the <code>causal</code> analyzer "
             "ran, each finding is ablated alone on held-out songs (its decoded contribution "
             "removed at the hook) against density-matched latents: <i>used</i> when its effect "
             "beats every control and the bootstrap interval over songs excludes 0; steering adds "
             "the latent's decoder row during generation and reports the shift of the label's "
             "share among the generated notes.</p>"]
    for hook, entry in hooks.items():
        s = entry.get("summary", {})
        passing = s.get("passing_min_auroc", {})
        null = s.get("null") or {}
        parts.append(f"<h3>{H.esc(hook)}: {s.get('findings', 0)} findings "
                     f"({s.get('findings_t', 0)} at t, {s.get('findings_t1', 0)} at t+1)</h3>")
        counts = ", ".join(f"{H.esc(g)} {c}" for g, c in passing.items())
        text = f"Units with AUROC &ge; {rule.get('min_auroc')} for some label: {counts}."
        if null.get("null_counts") is not None:
            text += (f" Under the permutation null (labels of other songs) "
                     f"{null.get('null_counts')} latents reach it (p = {_fmt(null.get('p'))}).")
        parts.append(f"<p>{text}</p>")
        rows, links = [], []
        page_set = set(pages.get(hook, []))
        for f in entry.get("findings", []):
            strongest = f.get("strongest_control", "")
            c = f.get("controls", {}).get(strongest, {})
            r = causal.get(hook, {}).get(int(f["latent"]))
            rows.append([f["latent"], f["label"], f["when"], f["auroc"], f["precision_mass"],
                         f["margin"], f"{strongest}: {c.get('unit', '')}", c.get("score"),
                         f["density"], _causal_cell(r), _steer_cell(r)])
            links.append(f"latents/{hook}/{f['latent']}.html" if f["latent"] in page_set else None)
        if rows:
            parts.append(H.table(["latent", "label", "when", "AUROC", "precision", "margin",
                                  "strongest control", "control AUROC", "density",
                                  "ablation effect [95% CI]", "steering shift [95% CI]"], rows,
                                 sortable=True, links={0: links}, scroll=True))
    return H.section("Findings that beat their controls", "\n".join(parts), "findings")


def _pct(x: Any) -> str:
    return f"{float(x):.0%}" if isinstance(x, (int, float)) else "?"


def _fmt(x: Any) -> str:
    return f"{float(x):.3g}" if isinstance(x, (int, float)) else "n/a"


def _overview_section(hooks: list[HookData], pages: dict[str, list[int]]) -> str:
    rows, links = [], []
    for d in hooks:
        holdout = d.metrics.get("holdout", {})
        live = int(_live(d).sum()) if d.n_latents else None
        rows.append([d.hook, d.n_latents, holdout.get("fvu"), holdout.get("l0"),
                     holdout.get("dead_fraction"), holdout.get("dense_fraction"),
                     _loss_recovered(d.metrics), live, len(pages.get(d.hook, []))])
        links.append(f"#dict-{d.hook}")
    if not rows:
        return H.section("Overview", "<p class=\"muted\">No trained dictionaries in this run.</p>")
    return H.section("Overview", H.table(
        ["hook", "latents", "holdout FVU", "L0", "dead", "dense", "loss recovered", "live",
         "latent pages"], rows, links={0: links}), "overview")


def _run_section(ctx: StageContext) -> str:
    import yaml

    manifest = _read_json(Path(ctx.run_dir) / "manifest.json")
    if not manifest:
        return ""
    info = {k: manifest.get(k) for k in ("run", "pipeline", "started_at", "argv")}
    rows = []
    for name, entry in manifest.get("stages", {}).items():
        summary = json.dumps(entry.get("summary"), default=str) if entry.get("summary") else ""
        rows.append((name, entry.get("status", ""), entry.get("seconds"),
                     entry.get("reason", entry.get("error", "")),
                     summary[:240] + ("..." if len(summary) > 240 else "")))
    versions = dict(manifest.get("versions", {}))
    plugins = versions.pop("plugins", [])
    parts = [
        '<div class="grid"><div>', H.kv_table(info), "<h3>Versions</h3>",
        H.kv_table({**versions, "plugins": ", ".join(plugins)}), "<h3>Inputs (sha256)</h3>",
        H.kv_table(manifest.get("inputs", {})), "</div><div><h3>Pipeline configuration</h3>",
        f"<pre>{H.esc(yaml.safe_dump(manifest.get('config', {}), sort_keys=False))}</pre>",
        "</div></div><h3>Stages</h3>",
        H.table(["stage", "status", "seconds", "note", "summary"], rows),
    ]
    return H.section("Run", "\n".join(parts), "run")


def _model_data_section(ctx: StageContext) -> str:
    header = ctx.pipeline.header
    parts = []
    if header.model is not None:
        args = _read_json(Path(header.model.path) / "train-args.json")
        parts.append(f"<h3>Model</h3><p>{H.esc(header.model.adapter.name)}: "
                     f"<code>{H.esc(header.model.path)}</code></p>")
        if args:
            parts.append(H.kv_table(args))
    if header.data is not None:
        parts.append(f"<h3>Data</h3><p><code>{H.esc(header.data.path)}</code> "
                     f"(split {H.esc(header.data.split)})</p>")
    stats = Path(ctx.run_dir) / "note_stats" / "summary.txt"
    if stats.exists():
        parts.append(f"<pre>{H.esc(stats.read_text())}</pre>")
    return H.section("Model and data", "\n".join(parts), "model") if parts else ""


def _dictionary_section(data: HookData, out: Path, pages: list[int]) -> str:
    hook = data.hook
    parts = ['<div class="grid"><div>']
    holdout = data.metrics.get("holdout", {})
    if holdout:
        keys = ("fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction", "mse", "tokens")
        parts.append("<h3>Holdout metrics</h3>" + H.kv_table({k: holdout[k] for k in keys
                                                             if k in holdout}))
    if data.config:
        learner = data.config.get("learner", {})
        recipe = {"learner": learner.get("name"), "architecture": data.config.get("architecture"),
                  "d_in": data.config.get("d_in"), "d_sae": data.config.get("d_sae"),
                  "k": data.config.get("k"), "steps": data.metrics.get("steps"),
                  "training tokens": data.metrics.get("tokens")}
        for key in ("l1_coeff", "lr", "batch_size"):
            recipe[key] = learner.get("config", {}).get(key)
        parts.append("<h3>Dictionary</h3>" + H.kv_table({k: v for k, v in recipe.items()
                                                         if v is not None}))
    downstream = data.metrics.get("downstream")
    if isinstance(downstream, dict) and downstream:
        parts.append("<h3>Next-token loss with the dictionary spliced in</h3>"
                     + _downstream_table(downstream))
    if data.sweep:
        curve = data.sweep.get("curve") or []
        if curve and isinstance(curve, list) and isinstance(curve[0], dict):
            keys = list(curve[0])
            parts.append(f"<h3>Sweep (this page shows {H.esc(data.member or '?')})</h3>"
                         + H.table(keys, [[row.get(k) for k in keys] for row in curve]))
    parts.append("</div><div>")
    hist = holdout.get("log10_density_histogram")
    if hist:
        png = _density_png(hist, out / "assets" / f"density_{hook}.png", hook)
        parts.append(f'<h3>Latent density (holdout)</h3><img src="assets/{H.esc(png.name)}" '
                     f'alt="density histogram of {H.esc(hook)}">')
    parts.append("</div></div>")
    parts.append(_latent_table(data, pages))
    return H.section(f"Dictionary {hook}", "\n".join(parts), f"dict-{hook}")


def _downstream_table(downstream: dict[str, Any]) -> str:
    """Per-field CE (clean / spliced / ablated) and fraction recovered, plus the scalars."""
    kinds = [k for k in ("clean", "spliced", "zero_ablated", "ablated", "delta_ce", "kl",
                         "recovered", "recovered_zero", "kl_recovered_zero")
             if isinstance(downstream.get(k), dict)]
    fields = list(dict.fromkeys(f for k in kinds for f in downstream[k]))
    out = ""
    ci = downstream.get("ci") if isinstance(downstream.get("ci"), dict) else {}
    if fields:
        rows = [[f, *(downstream[k].get(f) for k in kinds)] for f in fields]
        out += H.table(["field", *kinds], rows)
    if ci:
        keys = [k for k in ("delta_ce", "kl", "recovered", "recovered_zero") if isinstance(ci.get(k), dict)]
        rows = [[f, *(_interval(ci[k].get(f)) for k in keys)] for f in fields]
        out += (f"<p>{H.esc(str(ci.get('level', 0.95)))} intervals, bootstrap over "
                f"{H.esc(str(ci.get('unit', 'song')))}s:</p>" + H.table(["field", *keys], rows))
    scalars = {k: v for k, v in downstream.items() if k not in kinds and k != "ci"}
    return out + (H.kv_table(dict(_flatten(scalars))) if scalars else "")


def _interval(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return "n/a"


def _loss_recovered(metrics: dict[str, Any]) -> float | None:
    recovered = metrics.get("downstream", {}).get("recovered")
    if isinstance(recovered, dict):
        recovered = recovered.get("total")
    return recovered if isinstance(recovered, (int, float)) else None


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(value, list):
        return [(prefix, json.dumps(value)[:200])]
    return [(prefix, value)]


def _latent_table(data: HookData, pages: list[int]) -> str:
    if not data.n_latents:
        return ""
    columns = [c for c in LATENT_COLUMNS if c in data.per_latent]
    if data.examples is not None:
        columns += [c for c in ("max_activation", "density") if c not in columns]
    page_set = set(pages)
    order = _ranking(data)
    rows, links = [], []
    for i in order:
        i = int(i)
        rows.append([i, *(_latent_value(data, c, i) for c in columns)])
        links.append(f"latents/{data.hook}/{i}.html" if i in page_set else None)
    table_id = f"latents-{data.hook}"
    return (f"<h3>Latents ({data.n_latents}; {len(pages)} with a page, linked)</h3>"
            + H.filter_box(table_id)
            + H.table(["latent", *columns], rows, sortable=True, table_id=table_id,
                      links={0: links}, scroll=True))


def _probe_section(analyze: Path | None, out: Path) -> str:
    if analyze is None or not (analyze / "probe").is_dir():
        return ""
    folder = analyze / "probe"
    parts = []
    if (folder / "probe.csv").exists():
        with open(folder / "probe.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        if rows:
            body = [[_number(v) for v in r] for r in rows[1:]]
            parts.append(H.table(rows[0], body, sortable=True, scroll=True))
    for png in sorted(folder.glob("*.png")):
        shutil.copy2(png, out / "assets" / png.name)
        parts.append(f'<div><img src="assets/{H.esc(png.name)}" alt="{H.esc(png.stem)}"></div>')
    if (folder / "summary.md").exists():
        parts.append(f"<pre>{H.esc((folder / 'summary.md').read_text())}</pre>")
    return H.section("Linear probes", "\n".join(parts), "probe") if parts else ""


#: analyzers with a section of their own (the rest get a generic one)
_OWN_SECTIONS = {"feature_token", "top_examples", "probe"}


def _analyzer_sections(analyze: Path | None, out: Path,
                       summaries: dict[str, Any] | None = None) -> list[str]:
    """One section per other analyzer (causal, transposition, dictionary_compare, third-party):
    its plots, its ``summary.md``, the summary its ``analyze`` returned (``summaries``, by
    default from the analyze stage's completion marker) and the files it wrote."""
    if analyze is None:
        return []
    if summaries is None:  # what analyze returned, recorded in its completion marker
        from ..outputs import read_marker

        summaries = (read_marker(analyze) or {}).get("summary")
    summaries = summaries if isinstance(summaries, dict) else {}
    sections = []
    for folder in sorted(p for p in analyze.iterdir() if p.is_dir() and p.name not in _OWN_SECTIONS):
        parts = []
        for png in sorted(folder.glob("*.png")):
            name = f"{folder.name}_{png.name}"
            shutil.copy2(png, out / "assets" / name)
            parts.append(f'<div><img src="assets/{H.esc(name)}" alt="{H.esc(png.stem)}"></div>')
        if (folder / "summary.md").exists():
            parts.append(f"<pre>{H.esc((folder / 'summary.md').read_text())}</pre>")
        returned = summaries.get(folder.name)
        if isinstance(returned, dict) and returned:
            parts.append(H.kv_table(dict(_flatten(returned))))
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if files:
            shown = ", ".join(f"<code>{H.esc(f)}</code>" for f in files[:20])
            more = f" and {len(files) - 20} more" if len(files) > 20 else ""
            parts.append(f"<p>Files in <code>analyze/{H.esc(folder.name)}/</code>: {shown}{more}</p>")
        if parts:
            sections.append(H.section(f"Analysis: {folder.name}", "\n".join(parts), f"an-{folder.name}"))
    return sections


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# -- latent pages -------------------------------------------------------------------------
