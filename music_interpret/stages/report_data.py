"""What the ``report`` stage reads of a run: per dictionary its config, metrics and
analyzer outputs (:class:`HookData`), the ranking of its latents and the pages to render."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..context import StageContext

LATENT_COLUMNS = ("finding_label", "finding_margin", "best_label", "best_score", "best_label_t",
                  "best_score_t", "best_label_t1", "best_score_t1", "monosemanticity", "density")


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


# -- reading the run ----------------------------------------------------------------------


def _stage_dir(ctx: StageContext, name: str) -> Path | None:
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


def _causal_rows(analyze: Path | None, hook: str) -> dict[int, dict[str, Any]]:
    """The ``causal`` analyzer's result per tested latent of ``hook`` (empty without it)."""
    if analyze is None:
        return {}
    result = _read_json(analyze / "causal" / f"{hook}.json")
    return {int(r["latent"]): r for r in result.get("latents", []) if "latent" in r}
