"""Outputs of ``probe``: netCDF and CSV tables, two plots and ``summary.md``."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .attributes import ATTRIBUTES, Attribute
from .probe_fit import MC_REPS, OVR_REPS, UNIT_REPS, ProbeSettings
from .probe_metrics import METRICS, OVR_METRICS, STATS


def _labels(runs: Sequence[Any], attributes: Sequence[str]) -> list[tuple[str, int]]:
    """(attribute, code) of every one-vs-rest label probed for some hook, in attribute order."""
    out: list[tuple[str, int]] = []
    for a in attributes:
        codes = sorted({int(c) for r in runs if r.results.get(a) is not None
                        for c in r.results[a].classes})
        out += [(a, c) for c in codes]
    return out


def multiclass_dataset(runs: Sequence[Any], attributes: Sequence[str], meta: dict[str, Any]) -> Any:
    import xarray as xr

    shape = (len(runs), len(attributes))
    score = np.full((*shape, len(MC_REPS), len(METRICS), len(STATS)), np.nan)
    n_train, n_test, n_classes = (np.zeros(shape, np.int64) for _ in range(3))
    for h, run in enumerate(runs):
        for a, attr in enumerate(attributes):
            res = run.results.get(attr)
            if res is not None:
                score[h, a] = res.multiclass
                n_train[h, a], n_test[h, a], n_classes[h, a] = res.n_train, res.n_test, len(res.classes)
    hooks = [r.hook for r in runs]
    return xr.Dataset(
        {"score": (("hook", "attribute", "representation", "metric", "stat"), score),
         "n_train": (("hook", "attribute"), n_train), "n_test": (("hook", "attribute"), n_test),
         "n_classes": (("hook", "attribute"), n_classes),
         "split": (("hook",), [r.split.note for r in runs]),
         "split_source": (("hook",), [r.split.source for r in runs]),
         "train_songs": (("hook",), [int((~r.split.test).sum()) for r in runs]),
         "test_songs": (("hook",), [r.split.n_test for r in runs]),
         "when": (("attribute",), [ATTRIBUTES[a].when for a in attributes])},
        coords={"hook": hooks, "attribute": list(attributes), "representation": list(MC_REPS),
                "metric": list(METRICS), "stat": list(STATS)},
        attrs=meta)


def ovr_dataset(runs: Sequence[Any], attributes: Sequence[str], s: ProbeSettings,
                meta: dict[str, Any], table: Mapping[str, Attribute] | None = None) -> Any:
    """The one-vs-rest scores; labels named in ``table`` (the store's attributes)."""
    import xarray as xr

    labels = _labels(runs, attributes)
    where = {lab: i for i, lab in enumerate(labels)}
    kmax = max(s.ks)
    score = np.full((len(runs), len(labels), len(OVR_REPS), len(s.ks) + 1, len(OVR_METRICS),
                     len(STATS)), np.nan)
    selected = np.full((len(runs), len(labels), len(UNIT_REPS), kmax), -1, np.int64)
    n_pos = np.zeros((2, len(runs), len(labels)), np.int64)
    for h, run in enumerate(runs):
        for attr in attributes:
            res = run.results.get(attr)
            if res is None:
                continue
            for c, code in enumerate(res.classes):
                i = where[(attr, int(code))]
                score[h, i] = res.ovr[c]
                selected[h, i] = res.selected[c]
                n_pos[:, h, i] = res.n_pos_train[c], res.n_pos_test[c]
    table = table or ATTRIBUTES
    names = [f"{a}={table[a].label(c)}" for a, c in labels]
    return xr.Dataset(
        {"score": (("hook", "label", "representation", "k", "metric", "stat"), score),
         "selected": (("hook", "label", "unit_representation", "rank"), selected),
         "n_pos_train": (("hook", "label"), n_pos[0]), "n_pos_test": (("hook", "label"), n_pos[1]),
         "label_attribute": (("label",), [a for a, _ in labels]),
         "label_when": (("label",), [ATTRIBUTES[a].when for a, _ in labels])},
        coords={"hook": [r.hook for r in runs], "label": names,
                "representation": list(OVR_REPS), "k": s.k_labels,
                "metric": list(OVR_METRICS), "stat": list(STATS),
                "unit_representation": list(UNIT_REPS), "rank": np.arange(kmax)},
        attrs={**meta, "k_all": "all: the multinomial probe's probability of the value"})


def _fmt(x: float) -> str:
    return f"{x:.4f}" if np.isfinite(x) else ""


def write_multiclass_csv(path: Path, ds: Any) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["hook", "attribute", "when", "representation", "metric", *STATS,
                    "n_train", "n_test", "n_classes", "split"])
        for h in ds.hook.values:
            for a in ds.attribute.values:
                for r in ds.representation.values:
                    for m in ds.metric.values:
                        v = ds.score.sel(hook=h, attribute=a, representation=r, metric=m).values
                        w.writerow([h, a, str(ds.when.sel(attribute=a).values), r, m,
                                    *map(_fmt, v), int(ds.n_train.sel(hook=h, attribute=a)),
                                    int(ds.n_test.sel(hook=h, attribute=a)),
                                    int(ds.n_classes.sel(hook=h, attribute=a)),
                                    str(ds.split_source.sel(hook=h).values)])


def write_ovr_csv(path: Path, ds: Any) -> None:
    score = ds.score.values
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["hook", "label", "attribute", "when", "representation", "k", "metric", *STATS,
                    "n_pos_train", "n_pos_test"])
        for h, hook in enumerate(ds.hook.values):
            for i, label in enumerate(ds.label.values):
                if not np.isfinite(score[h, i]).any():
                    continue
                attr = str(ds.label_attribute.values[i])
                when = str(ds.label_when.values[i])
                npt, npe = int(ds.n_pos_train.values[h, i]), int(ds.n_pos_test.values[h, i])
                for r, rep in enumerate(ds.representation.values):
                    for j, k in enumerate(ds.k.values):
                        for m, metric in enumerate(ds.metric.values):
                            v = score[h, i, r, j, m]
                            if np.isfinite(v[0]):
                                w.writerow([hook, label, attr, when, rep, k, metric,
                                            *map(_fmt, v), npt, npe])


def mean_auroc(ds: Any, hook: str, rep: str, k: str, attribute: str | None = None,
               when: str | None = None) -> float:
    """Mean test AUROC over the labels (of ``attribute`` / at ``when``) of one probe."""
    v = ds.score.sel(hook=hook, representation=rep, k=k, metric="auroc", stat="value").values
    keep = np.ones(len(v), bool)
    if attribute is not None:
        keep &= ds.label_attribute.values == attribute
    if when is not None:
        keep &= ds.label_when.values == when
    v = v[keep & np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def plot_multiclass(path: Path, ds: Any, metric: str = "accuracy") -> None:
    """Accuracy per attribute across hook points: embedding, raw, latents and baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(ds.attribute.values)
    cols = min(5, len(attrs))
    rows = -(-len(attrs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                             sharey=True)
    x = np.arange(ds.sizes["hook"])
    for ax, a in zip(axes.flat, attrs, strict=False):
        for r in ds.representation.values:
            v = ds.score.sel(attribute=a, representation=r, metric=metric)
            val, lo, hi = (v.sel(stat=s).values for s in STATS)
            style = "--" if r in ("majority", "shuffled") else "-"
            ax.errorbar(x, val, yerr=[val - lo, hi - val], fmt=style + "o", ms=3, capsize=2,
                        label=str(r))
        ax.set_title(str(a), fontsize=8)
        ax.set_xticks(x, [str(h) for h in ds.hook.values], fontsize=6, rotation=20)
        ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[len(attrs):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"multiclass probes ({metric}, 95% song-bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ovr(path: Path, ds: Any) -> None:
    """Mean one-vs-rest AUROC against k, per hook; solid: labels at t, dashed: at t+1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(ds.hook.values)
    fig, axes = plt.subplots(1, len(hooks), figsize=(4 * len(hooks), 3), squeeze=False, sharey=True)
    ks = list(ds.k.values)
    for ax, hook in zip(axes.flat, hooks, strict=True):
        for r, rep in enumerate(["embedding", "raw", "latents", "shuffled"]):
            for when, style in (("t", "-"), ("t+1", "--")):
                ys = [mean_auroc(ds, hook, rep, k, when=when) for k in ks]
                ax.plot(range(len(ks)), ys, style, marker="o", ms=3, color=f"C{r}",
                        label=f"{rep} ({when})")
        ax.set_xticks(range(len(ks)), ks)
        ax.set_xlabel("k")
        ax.set_title(hook, fontsize=9)
        ax.set_ylim(0.4, 1.01)
    axes[0, 0].set_ylabel("mean AUROC over labels")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(mc: Any, ovr: Any, s: ProbeSettings) -> str:
    kmax = str(max(s.ks))
    lines = ["# probe", "", f"Input embedding: {mc.attrs['embedding']}.", "",
             "Multiclass: accuracy on test songs (95% song-bootstrap CI). One-vs-rest: mean test "
             f"AUROC over the attribute's values, for k = 1, {kmax} and all units.", ""]
    for hook in mc.hook.values:
        lines += [f"## {hook}", "", f"Split: {mc.split.sel(hook=hook).values}.", "",
                  "| attribute | when | embedding | raw | latents | majority | shuffled | "
                  f"latents k1 | latents k{kmax} | latents all | raw k1 | embedding k1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in mc.attribute.values:
            acc = mc.score.sel(hook=hook, attribute=a, metric="accuracy")
            if not np.isfinite(acc.sel(stat="value").values).any():
                continue
            cells = []
            for rep in mc.representation.values:
                v = acc.sel(representation=rep).values
                cells.append(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if np.isfinite(v[0]) else "")
            au = [mean_auroc(ovr, hook, rep, k, attribute=str(a)) for rep, k in
                  (("latents", "1"), ("latents", kmax), ("latents", "all"), ("raw", "1"),
                   ("embedding", "1"))]
            lines.append(f"| {a} | {mc.when.sel(attribute=a).values} | " + " | ".join(cells)
                         + " | " + " | ".join(f"{x:.3f}" if np.isfinite(x) else "" for x in au)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out: Path, runs: Sequence[Any], attributes: Sequence[str], s: ProbeSettings,
                  meta: dict[str, Any], table: Mapping[str, Attribute] | None = None) -> dict[str, Any]:
    """Write every output file; returns the manifest summary."""
    out.mkdir(parents=True, exist_ok=True)
    mc = multiclass_dataset(runs, attributes, meta)
    ovr = ovr_dataset(runs, attributes, s, meta, table)
    for name, ds in (("probe.nc", mc), ("probe_ovr.nc", ovr)):
        tmp = out / f".{name}.tmp"
        ds.to_netcdf(tmp)
        tmp.replace(out / name)
    write_multiclass_csv(out / "probe.csv", mc)
    write_ovr_csv(out / "probe_ovr.csv", ovr)
    plot_multiclass(out / "probe.png", mc)
    plot_ovr(out / "probe_ovr.png", ovr)
    (out / "summary.md").write_text(summary_markdown(mc, ovr, s), encoding="utf-8")
    kmax = str(max(s.ks))
    summary: dict[str, Any] = {"embedding": meta["embedding_source"], "hooks": {}}
    for run in runs:
        acc = mc.score.sel(hook=run.hook, metric="accuracy", stat="value")
        summary["hooks"][run.hook] = {
            "split": run.split.source, "tokens": int(len(run.index)), "test_tokens": int(run.test.sum()),
            "attributes": {a: {**{r: _round(acc.sel(attribute=a, representation=r))
                                  for r in ("embedding", "raw", "latents", "majority")},
                               "ovr_latents_k1": _round(mean_auroc(ovr, run.hook, "latents", "1", a)),
                               f"ovr_latents_k{kmax}": _round(mean_auroc(ovr, run.hook, "latents",
                                                                         kmax, a))}
                           for a in attributes}}
    return summary


def _round(v: Any) -> float | None:
    x = float(v)
    return round(x, 4) if np.isfinite(x) else None
