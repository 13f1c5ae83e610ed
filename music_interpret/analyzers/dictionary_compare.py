"""``dictionary_compare``: feature splitting across sizes and stability across seeds, in a sweep.

For a hook trained as a sweep (``train.sweep: {d_sae: [256, 1024, 4096], seed: [0, 1]}``)
the members' decoder rows (unit-normalised; dead latents left out: those that never fire
on ``sample_tokens`` tokens of the store) are compared by cosine:

* **Feature splitting**: for members that differ only in size (``d_sae`` or
  ``expansion``), for every smaller -> larger pair and every live latent of the smaller
  dictionary, its *children*: the live latents of the larger one whose decoder rows have
  cosine > ``split_threshold`` with it. Counts of latents with no child (unmatched), one
  (kept) and two or more (split), and how many children a split has.
* **Cross-seed stability**: for members that differ only in ``seed``, for every ordered
  pair (a, b), the share of a's live latents whose best match among b's live latents
  has cosine > each of ``match_thresholds``.

Control: the same statistics with the other dictionary's live rows replaced by as many
random unit vectors (seeded): what the thresholds pass by chance. For splitting also the
larger dictionary's own neighbourhood: how many other latents of that dictionary lie
above ``split_threshold`` from each of its latents, on average. When that is close to
the mean number of children, the "children" are the neighbours of a cluster of related
latents already present at one size, not the pieces of a split.

Members come from ``ctx.sweeps`` (the analyze stage), else from the sweep folders under
``ctx.train_dir/dictionaries``. Outputs: ``<hook>_splitting.csv`` (per smaller latent and
pair), ``<hook>_stability.csv`` (per latent and seed pair), ``compare.json`` and
``summary.md``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..interfaces import Analyzer
from ..jsonio import write_json_atomic

if TYPE_CHECKING:
    from .context import AnalysisContext

SIZE_PARAMS = ("d_sae", "expansion")
CHUNK = 2048


@dataclass
class CompareConfig:
    """Options of ``dictionary_compare``."""

    split_threshold: float = 0.5
    match_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.9])
    sample_tokens: int = 8192

    def __post_init__(self) -> None:
        if not 0 < self.split_threshold < 1:
            raise ValueError(f"split_threshold must be in (0, 1), got {self.split_threshold}")
        if not self.match_thresholds or not all(0 < t < 1 for t in self.match_thresholds):
            raise ValueError(f"match_thresholds must be numbers in (0, 1), got {self.match_thresholds}")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be positive, got {self.sample_tokens}")


def parse_label(label: str) -> dict[str, str]:
    """``d_sae=256,seed=0`` -> {"d_sae": "256", "seed": "0"}."""
    out = {}
    for part in label.split(","):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def unit_rows(w: Any) -> Any:
    """Rows scaled to unit length (torch)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def best_matches(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine, index of the best row of ``b``) for every row of ``a`` (unit rows)."""
    import torch

    best = torch.empty(len(a), dtype=a.dtype, device=a.device)
    where = torch.empty(len(a), dtype=torch.long, device=a.device)
    if len(b) == 0:
        return np.full(len(a), np.nan), np.full(len(a), -1)
    for s in range(0, len(a), CHUNK):
        best[s: s + CHUNK], where[s: s + CHUNK] = (a[s: s + CHUNK] @ b.T).max(dim=1)
    return best.float().cpu().numpy(), where.cpu().numpy()


def children(a: Any, b: Any, threshold: float) -> list[list[tuple[int, float]]]:
    """For every row of ``a``: the rows of ``b`` with cosine > ``threshold`` (index, cosine),
    best first."""
    out: list[list[tuple[int, float]]] = []
    for s in range(0, len(a), CHUNK):
        cos = (a[s: s + CHUNK] @ b.T).float().cpu().numpy()
        for row in cos:
            hit = np.flatnonzero(row > threshold)
            hit = hit[np.argsort(-row[hit])]
            out.append([(int(j), float(row[j])) for j in hit])
    return out


def random_rows(n: int, d: int, seed: int, like: Any) -> Any:
    """``n`` random unit vectors of dimension ``d`` (seeded), on ``like``'s device and dtype."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return unit_rows(torch.randn(n, d, generator=g)).to(like)


def split_counts(n_children: np.ndarray) -> dict[str, Any]:
    """Counts of smaller latents with 0, 1 and 2+ children, and the size of the splits."""
    split = n_children[n_children >= 2]
    return {"latents": int(len(n_children)), "unmatched": int((n_children == 0).sum()),
            "kept": int((n_children == 1).sum()), "split": int(len(split)),
            "split_share": float(len(split) / max(len(n_children), 1)),
            "mean_children_of_split": float(split.mean()) if len(split) else None,
            "max_children": int(n_children.max()) if len(n_children) else 0,
            "histogram": {str(c): int((n_children == c).sum()) for c in range(5)}
            | {"5+": int((n_children >= 5).sum())}}


@dataclass
class Member:
    """One dictionary of a sweep: its label, options, size and live unit decoder rows."""

    label: str
    params: dict[str, str]
    d_sae: int
    live: np.ndarray  # indices of live latents
    rows: Any  # unit decoder rows of the live latents (torch)


def load_member(label: str, folder: Path, x: Any, device: str) -> Member:
    """Decoder rows of ``folder``'s dictionary; live latents fire on some row of ``x``."""
    import torch

    from ..learners.io import load_dictionary

    d = load_dictionary(folder, device=device)
    fired = torch.zeros(d.d_sae, dtype=torch.bool)
    for s in range(0, len(x), CHUNK):
        fired |= (d.encode_host(x[s: s + CHUNK]) > 0).any(0)
    live = np.flatnonzero(fired.numpy())
    rows = unit_rows(d.W_dec.detach().float()[torch.as_tensor(live, device=d.W_dec.device)])
    return Member(label, parse_label(label), d.d_sae, live, rows)


def group_by(members: list[Member], ignore: tuple[str, ...]) -> list[list[Member]]:
    """Members grouped by every option except ``ignore`` (groups of two or more)."""
    groups: dict[tuple[tuple[str, str], ...], list[Member]] = {}
    for m in members:
        key = tuple(sorted((k, v) for k, v in m.params.items() if k not in ignore))
        groups.setdefault(key, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def splitting(members: list[Member], cfg: CompareConfig, seed: int) -> tuple[list[dict], list[list]]:
    """Summary per (smaller, larger) pair and CSV rows per smaller latent."""
    pairs, rows = [], []
    for group in group_by(members, SIZE_PARAMS):
        group = sorted(group, key=lambda m: m.d_sae)
        for i, small in enumerate(group):
            for large in group[i + 1:]:
                if large.d_sae == small.d_sae:
                    continue
                kids = children(small.rows, large.rows, cfg.split_threshold)
                n = np.array([len(k) for k in kids], np.int64)
                rand = random_rows(len(large.live), large.rows.shape[1], seed, large.rows)
                n_rand = np.array([len(k) for k in children(small.rows, rand, cfg.split_threshold)],
                                  np.int64)
                within = np.array([len(k) - 1 for k in children(large.rows, large.rows,
                                                                   cfg.split_threshold)])
                pairs.append({"smaller": small.label, "larger": large.label,
                              "d_sae": [small.d_sae, large.d_sae], **split_counts(n),
                              "mean_children": float(n.mean()) if len(n) else None,
                              "control_random": split_counts(n_rand),
                              "control_within_larger_mean": float(within.mean())
                              if len(within) else None})
                for latent, kid in zip(small.live, kids, strict=True):
                    rows.append([small.label, large.label, int(latent), len(kid),
                                 " ".join(f"{large.live[j]}:{c:.3f}" for j, c in kid),
                                 f"{kid[0][1]:.4f}" if kid else ""])
    return pairs, rows


def stability(members: list[Member], cfg: CompareConfig, seed: int) -> tuple[list[dict], list[list]]:
    """Summary per ordered seed pair and CSV rows per latent."""
    pairs, rows = [], []
    for group in group_by(members, ("seed",)):
        for a in group:
            for b in group:
                if a is b:
                    continue
                best, where = best_matches(a.rows, b.rows)
                rand = random_rows(len(b.live), b.rows.shape[1], seed, b.rows)
                best_rand, _ = best_matches(a.rows, rand)
                pairs.append({"a": a.label, "b": b.label, "latents": int(len(a.live)),
                              "share_above": {f"{t:g}": float((best > t).mean()) if len(best) else None
                                              for t in cfg.match_thresholds},
                              "control_random": {f"{t:g}": float((best_rand > t).mean())
                                                 if len(best_rand) else None
                                                 for t in cfg.match_thresholds},
                              "median_best_cos": float(np.median(best)) if len(best) else None})
                for latent, c, j in zip(a.live, best, where, strict=True):
                    rows.append([a.label, b.label, int(latent), int(b.live[j]), f"{c:.4f}"])
    return pairs, rows


def sweep_members(ctx: AnalysisContext) -> dict[str, dict[str, Path]]:
    """{hook: {label: folder}} from the context, else from the train stage's sweep folders."""
    if ctx.sweeps:
        return dict(ctx.sweeps)
    if ctx.train_dir is None:
        return {}
    from ..stages.analyze import find_dictionaries

    _, sweeps = find_dictionaries(Path(ctx.train_dir) / "dictionaries")
    return sweeps


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def summary_markdown(result: dict[str, Any], cfg: CompareConfig) -> str:
    lines = ["# dictionary_compare", "",
             f"Decoder-row cosines between the live latents of a sweep's members. Splitting: "
             f"children = latents of the larger dictionary with cosine > {cfg.split_threshold:g}. "
             "Stability: share of latents whose best match in the other seed's dictionary "
             "passes the threshold. Controls: random unit vectors in place of the other "
             "dictionary; for splitting also the mean number of other latents of the larger "
             "dictionary above the threshold from each of its latents (its own clusters).", ""]
    for hook, r in result.items():
        lines += [f"## {hook}", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        if r["splitting"]:
            lines += ["| smaller | larger | live | unmatched | kept | split | mean children | "
                      "split (random) | neighbours within larger (mean) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for p in r["splitting"]:
                mean, within = p["mean_children_of_split"], p.get("control_within_larger_mean")
                lines.append(f"| {p['smaller']} | {p['larger']} | {p['latents']} | {p['unmatched']} "
                             f"| {p['kept']} | {p['split']} | {'' if mean is None else f'{mean:.2f}'} "
                             f"| {p['control_random']['split']} "
                             f"| {'' if within is None else f'{within:.2f}'} |")
            lines.append("")
        if r["stability"]:
            ts = [f"{t:g}" for t in cfg.match_thresholds]
            lines += ["| a | b | live | " + " | ".join(f"> {t}" for t in ts) + " | "
                      + " | ".join(f"> {t} (random)" for t in ts) + " |",
                      "|---|---|---|" + "---|" * (2 * len(ts))]
            for p in r["stability"]:
                cells = [p["share_above"][t] for t in ts] + [p["control_random"][t] for t in ts]
                lines.append(f"| {p['a']} | {p['b']} | {p['latents']} | "
                             + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


class DictionaryCompareAnalyzer(Analyzer):
    """Feature splitting across dictionary sizes and stability across seeds, within a sweep."""

    name = "dictionary_compare"
    description = ("Decoder-cosine comparison of a sweep's dictionaries: feature splitting "
                   "across sizes, cross-seed stability, against random unit vectors.")
    Config = CompareConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        from .probe_data import read_rows

        cfg: CompareConfig = self.config
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sweeps = sweep_members(ctx)
        result: dict[str, Any] = {}
        info = ctx.store
        for hook, folders in sweeps.items():
            n = min(cfg.sample_tokens, info.n_tokens, ctx.max_tokens or info.n_tokens)
            index = np.sort(np.random.default_rng(ctx.seed).choice(info.n_tokens, n, replace=False))
            x = read_rows(info, hook, index)
            members = [load_member(label, folder, x, ctx.device) for label, folder in folders.items()]
            split_pairs, split_rows = splitting(members, cfg, ctx.seed)
            stab_pairs, stab_rows = stability(members, cfg, ctx.seed)
            note = "" if split_pairs or stab_pairs else (
                "no members differ only in size or only in seed: nothing to compare")
            result[hook] = {"members": {m.label: {"d_sae": m.d_sae, "live": int(len(m.live))}
                                        for m in members},
                            "splitting": split_pairs, "stability": stab_pairs, "note": note}
            _write_csv(out / f"{hook}_splitting.csv", ["smaller", "larger", "latent", "n_children",
                                                         "children", "best_cos"], split_rows)
            _write_csv(out / f"{hook}_stability.csv", ["a", "b", "latent", "best_match", "cos"],
                       stab_rows)
        write_json_atomic(out / "compare.json", {"split_threshold": cfg.split_threshold,
                                                 "match_thresholds": cfg.match_thresholds,
                                                 "sample_tokens": cfg.sample_tokens,
                                                 "hooks": result})
        text = summary_markdown(result, cfg) if result else (
            "# dictionary_compare\n\nNo hook was trained as a sweep: nothing to compare.\n")
        (out / "summary.md").write_text(text, encoding="utf-8")
        return {hook: {"splitting": [{k: p[k] for k in ("smaller", "larger", "split", "kept",
                                                        "unmatched")} for p in r["splitting"]],
                       "stability": [{"a": p["a"], "b": p["b"], **p["share_above"]}
                                     for p in r["stability"]]}
                for hook, r in result.items()}
