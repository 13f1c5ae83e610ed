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
import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..interfaces import Stage
from . import report_html as H

LATENT_COLUMNS = ("finding_label", "finding_margin", "best_label", "best_score", "best_label_t",
                  "best_score_t", "best_label_t1", "best_score_t1", "monosemanticity", "density")


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


@dataclass
class HookData:
    """What the run produced for one dictionary."""

    hook: str
    folder: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    per_latent: dict[str, np.ndarray] = field(default_factory=dict)
    labels: Any = None  # xarray.Dataset of (latent, label) variables, or None
    examples: Any = None  # top_examples.nc, or None
    examples_dir: Path | None = None
    rendered: dict[int, dict[str, Any]] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)  # sweep.json of a sweep
    member: str | None = None  # the sweep member shown (the one the analyzers looked at)

    @property
    def n_latents(self) -> int:
        if self.config.get("d_sae"):
            return int(self.config["d_sae"])
        for values in self.per_latent.values():
            return len(values)
        return 0


class ReportStage(Stage):
    """Write the run's HTML report."""

    name = "report"
    description = "Static offline HTML report: run summary, metrics, probes, latent pages."
    Config = ReportConfig

    def run(self, ctx: Any) -> dict[str, Any]:
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


# -- reading the run ----------------------------------------------------------------------


def _stage_dir(ctx: Any, name: str) -> Path | None:
    """Published output of stage ``name`` (from this pipeline, else ``<run>/<name>``)."""
    from ..outputs import MARKER

    for path in (ctx.upstream.get(name), Path(ctx.run_dir) / name):
        if path is not None and (Path(path) / MARKER).exists():
            return Path(path)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hook_names(train: Path | None, analyze: Path | None) -> list[str]:
    names: list[str] = []
    if train is not None:
        names += [p.parent.name for p in sorted((train / "dictionaries").glob("*/config.json"))]
        names += [p.parent.name for p in sorted((train / "dictionaries").glob("*/sweep.json"))]
    if analyze is not None:
        names += [p.parent.name for p in sorted((analyze / "top_examples").glob("*/top_examples.nc"))]
        names += [p.stem for p in sorted((analyze / "feature_token").glob("*.nc"))]
    return list(dict.fromkeys(names))


def _hook_data(hook: str, train: Path | None, analyze: Path | None) -> HookData:
    import xarray as xr

    data = HookData(hook)
    if train is not None and (train / "dictionaries" / hook).is_dir():
        data.folder = train / "dictionaries" / hook
        if not (data.folder / "config.json").exists():  # a sweep: the member analyze looked at
            data.sweep = _read_json(data.folder / "sweep.json")
            member = _analyzed_member(analyze, hook) or next(
                (p.parent.name for p in sorted(data.folder.glob("*/config.json"))), None)
            if member is not None:
                data.member, data.folder = member, data.folder / member
        data.config = _read_json(data.folder / "config.json")
        data.metrics = _read_json(data.folder / "metrics.json")
    if analyze is None:
        return data
    ft = analyze / "feature_token" / f"{hook}.nc"
    if ft.exists():
        with xr.open_dataset(ft) as ds:
            ds = ds.load()
        data.per_latent = {k: _plain(ds[k].values) for k in ds.data_vars if ds[k].dims == ("latent",)}
        two_d = [k for k in ds.data_vars if set(ds[k].dims) == {"latent", "label"}]
        data.labels = ds[two_d].transpose("latent", "label") if two_d else None
    folder = analyze / "top_examples" / hook
    if (folder / "top_examples.nc").exists():
        with xr.open_dataset(folder / "top_examples.nc") as ds:
            data.examples = ds.load()
        data.examples_dir = folder
        index = _read_json(folder / "index.json")
        data.rendered = {int(e["latent"]): e for e in index.get("latents", [])}
    return data


def _analyzed_member(analyze: Path | None, hook: str) -> str | None:
    """The sweep member of ``hook`` the analyze stage analysed (from its completion marker)."""
    if analyze is None:
        return None
    summary = (_read_json(analyze / ".stage.json").get("summary") or {})
    members = summary.get("sweep_members", {})
    member = members.get(hook) if isinstance(members, dict) else None
    return member if isinstance(member, str) else None


def _plain(values: np.ndarray) -> np.ndarray:
    return values.astype(str) if values.dtype.kind in "OSU" else values


def _latent_value(data: HookData, key: str, latent: int) -> Any:
    if key in data.per_latent:
        value = data.per_latent[key][latent]
    elif data.examples is not None and key in data.examples:
        value = data.examples[key].values[latent]
    else:
        return None
    return value.item() if hasattr(value, "item") else value


def _ranking(data: HookData) -> np.ndarray:
    """Order of the latents for pages and tables: findings first (largest margin over the
    controls first), then monosemanticity x best score, else max activation."""
    n = data.n_latents
    mono, best = data.per_latent.get("monosemanticity"), data.per_latent.get("best_score")
    if mono is not None and best is not None and len(mono) == n and mono.dtype.kind == "f":
        key = np.nan_to_num(mono * best, nan=-np.inf)
        margin = data.per_latent.get("finding_margin")
        if margin is not None and len(margin) == n and margin.dtype.kind == "f":
            key = np.where(np.isfinite(margin), 10.0 + margin, key)  # findings above the rest
        return np.argsort(-key, kind="stable")
    for key in ("monosemanticity", "best_score", "max_activation"):
        values = data.per_latent.get(key)
        if values is None and data.examples is not None and key in data.examples:
            values = data.examples[key].values
        if values is not None and len(values) == n and values.dtype.kind in "fiu":
            return np.argsort(-np.nan_to_num(values.astype(float), nan=-np.inf), kind="stable")
    return np.arange(n)


def _live(data: HookData) -> np.ndarray:
    if data.examples is not None and "max_activation" in data.examples:
        return data.examples["max_activation"].values > 0
    density = data.per_latent.get("density")
    if density is not None and density.dtype.kind == "f":
        return density > 0
    return np.ones(data.n_latents, bool)


def _pick_pages(data: HookData, max_pages: int, sample_rest: int, seed: int) -> list[int]:
    """The latents ``top_examples`` rendered (findings, best ranked, a sample), so that every
    page has its piano rolls and MIDI; without renderings, the best ranked live latents plus
    a random sample."""
    if data.rendered:
        return list(data.rendered)
    live = _live(data)
    order = [int(i) for i in _ranking(data) if live[i]]
    first = list(dict.fromkeys([*data.rendered, *order]))[:max_pages]
    taken = set(first)
    rest = [i for i in order if i not in taken]
    rng = np.random.default_rng(seed)
    sample = rng.choice(rest, min(sample_rest, len(rest)), replace=False) if rest else []
    return first + sorted(int(i) for i in sample)


# -- index sections -----------------------------------------------------------------------


def _causal_rows(analyze: Path | None, hook: str) -> dict[int, dict[str, Any]]:
    """The ``causal`` analyzer's result per tested latent of ``hook`` (empty without it)."""
    if analyze is None:
        return {}
    result = _read_json(analyze / "causal" / f"{hook}.json")
    return {int(r["latent"]): r for r in result.get("latents", []) if "latent" in r}


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


def _run_section(ctx: Any) -> str:
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


def _model_data_section(ctx: Any) -> str:
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


def _density_png(hist: dict[str, Any], path: Path, hook: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"], float)
    counts = np.asarray(hist["counts"], float)
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7bb0",
           edgecolor="white")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title(f"{hook}: how often each latent fires", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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


def _analyzer_sections(analyze: Path | None, out: Path) -> list[str]:
    """One section per other analyzer (causal, transposition, dictionary_compare, third-party):
    its ``summary.md`` and its plots."""
    if analyze is None:
        return []
    sections = []
    for folder in sorted(p for p in analyze.iterdir() if p.is_dir() and p.name not in _OWN_SECTIONS):
        parts = []
        for png in sorted(folder.glob("*.png")):
            name = f"{folder.name}_{png.name}"
            shutil.copy2(png, out / "assets" / name)
            parts.append(f'<div><img src="assets/{H.esc(name)}" alt="{H.esc(png.stem)}"></div>')
        if (folder / "summary.md").exists():
            parts.append(f"<pre>{H.esc((folder / 'summary.md').read_text())}</pre>")
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


def _latent_page(data: HookData, latent: int, out: Path, top_labels: int, title: str) -> None:
    folder = out / "latents" / data.hook
    folder.mkdir(parents=True, exist_ok=True)
    stats = {c: _latent_value(data, c, latent) for c in (*LATENT_COLUMNS, "max_activation")}
    parts = [H.kv_table({k: v for k, v in stats.items() if v is not None})]
    if data.labels is not None:
        parts.append(_label_table(data.labels, latent, top_labels))
    entry = data.rendered.get(latent, {})
    files = [entry.get("png"), entry.get("txt"), *entry.get("midi", [])]
    for name in files:
        if name and data.examples_dir is not None and (data.examples_dir / name).exists():
            shutil.copy2(data.examples_dir / name, folder / name)
    if entry.get("png"):
        parts.append(f'<h3>Top examples (piano roll; red: activating note)</h3>'
                     f'<img src="{H.esc(entry["png"])}" alt="piano roll of latent {latent}">')
    if entry.get("midi"):
        links = " ".join(f'<a href="{H.esc(m)}" download>{H.esc(m)}</a>' for m in entry["midi"])
        parts.append(f"<h3>MIDI</h3><p>{links}</p>")
    if data.examples is not None:
        parts.append("<h3>Top-activating tokens</h3>" + _examples_table(data.examples, latent))
    if entry.get("txt") and (folder / entry["txt"]).exists():
        parts.append(f"<h3>Context notes</h3><pre>{H.esc((folder / entry['txt']).read_text())}</pre>")
    nav = (f'<a href="../../index.html#dict-{H.esc(data.hook)}">back to the report</a>')
    (folder / f"{latent}.html").write_text(
        H.page(f"{data.hook} latent {latent}", "\n".join(parts), nav=nav + f" - {H.esc(title)}"))


def _label_table(labels: Any, latent: int, top: int) -> str:
    row = labels.isel(latent=latent)
    key = next((k for k in ("auroc", "score", "f1", "precision", "auc") if k in row), next(iter(row)))
    values = np.nan_to_num(np.asarray(row[key].values, float), nan=-np.inf)
    best = np.argsort(-values, kind="stable")[:top]
    names = list(row.data_vars)
    label_values = row["label"].values if "label" in row.coords else np.arange(values.size)
    rows = [[str(label_values[j]), *(row[k].values[j].item() for k in names)] for j in best]
    return f"<h3>Top labels (by {H.esc(key)})</h3>" + H.table(["label", *names], rows, sortable=True)


def _vocabulary_names(ds: Any) -> tuple[list[str], list[str]]:
    """(event names, instrument names) the top examples were recorded in: the dataset's own
    record, else the vocabulary of the store it names (outputs written before the record)."""
    if "event_names" in ds.attrs:
        return json.loads(ds.attrs["event_names"]), json.loads(ds.attrs.get("instrument_names", "[]"))
    return _store_names(str(ds.attrs.get("store", "")))


@functools.lru_cache(maxsize=8)
def _store_names(store: str) -> tuple[list[str], list[str]]:
    from ..errors import UserError
    from ..vocabulary import default_vocabulary

    vocabulary = default_vocabulary()
    if store:
        try:
            from ..stores import open_store

            vocabulary = open_store(store).vocabulary
        except (OSError, UserError):
            pass
    return list(vocabulary.events), list(vocabulary.instruments)


def _examples_table(ds: Any, latent: int) -> str:
    TYPE_NAMES, INSTRUMENT_NAMES = _vocabulary_names(ds)  # noqa: N806
    row = ds.isel(latent=latent)
    names = [str(s) for s in ds.song_name.values]
    rows = []
    for r in range(row.sizes["rank"]):
        if int(row.token[r]) < 0:
            break
        song, et, inst = int(row.song[r]), int(row.event_type[r]), int(row.instrument[r])
        rows.append([r + 1, float(row.activation[r]), names[song] if 0 <= song < len(names) else song,
                     int(row.song_token[r]), TYPE_NAMES[et] if 0 <= et < len(TYPE_NAMES) else et,
                     int(row.beat[r]), int(row.position[r]), int(row.pitch[r]),
                     INSTRUMENT_NAMES[inst] if 0 < inst < len(INSTRUMENT_NAMES) else ""])
    return H.table(["rank", "activation", "song", "token", "event", "beat", "position", "pitch",
                    "instrument"], rows, sortable=True)
