"""``transposition``: which latents ignore the key, and which move with the pitch.

On the dictionary's held-out songs (its ``config.json``; up to ``max_songs``), every pitch
is transposed by each k of ``shifts`` semitones (a song is skipped for a k that would take
a pitch outside the model's range; ``ModelAdapter.transpose``). The model runs at the
dictionary's hook point through the adapter, on the windows the extract stage makes
(``ModelAdapter.tokenize`` and ``song_windows``; transposition keeps the notes' order, so
the windows and tokens line up one to one), and the
dictionary encodes the activations of the tokens each window owns (note tokens by
default). The codes before and after are compared token by token
(:mod:`.transposition_stats`): per latent its **invariance** (correlation with itself)
and **equivariance** (a partner latent fires on the transposed input where it fired on
the original, with its best pitch label shifted by k), and its class: invariant,
equivariant, neither, rare.

Controls: ``random_init``, the same statistics for a dictionary of the same size and
architecture at initialisation (random unit encoder columns, ReLU/top-k; at most
``control_latents`` latents); ``shuffled_labels``, the trained dictionary's correlations
with the best-pitch labels permuted among latents (``n_perm`` times): equivariant
latents found by chance label matches.

Outputs per hook: ``<hook>.nc`` (latent x semitones: the shift), ``<hook>.csv`` (per latent), and
``summary.md``; the model and dictionary run on ``ctx.device``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter, SongDataset
    from .context import AnalysisContext
from .probe_data import TOKENS
from .transposition_stats import (
    CLASSES,
    best_pitch,
    classify,
    shift_stats,
    shuffled_label_counts,
)

#: coordinates of a window's rows that a transposition must leave as they are
ALIGNED = ("event_type", "beat", "position", "duration", "instrument")


@dataclass
class TranspositionConfig:
    """Options of ``transposition`` (see the module docstring)."""

    shifts: list[int] = field(default_factory=lambda: [-5, -2, -1, 1, 2, 5, 7])
    tokens: str = "notes"
    max_songs: int = 64
    max_tokens: int = 20_000
    batch_size: int = 8
    stride: int | None = None
    min_fires: int = 10
    invariant_threshold: float = 0.8
    equivariant_threshold: float = 0.8
    control_latents: int = 4096
    n_perm: int = 20

    def __post_init__(self) -> None:
        if not self.shifts or 0 in self.shifts or len(set(self.shifts)) != len(self.shifts):
            raise ValueError(f"shifts must be distinct non-zero semitone counts, got {self.shifts}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        for name in ("max_songs", "max_tokens", "batch_size", "min_fires", "control_latents", "n_perm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("invariant_threshold", "equivariant_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class SongWindows:
    """One song (the adapter's), its windows' inputs, the input positions kept, the pitch of
    each kept row (-1 off notes) and the coordinates that must line up under transposition."""

    name: str
    song: Any
    codes: list[np.ndarray]
    keep: list[np.ndarray]
    pitch: list[np.ndarray]
    aligned: list[np.ndarray]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(k) for k in self.keep))


def _windows(adapter: ModelAdapter, song: Any, stride: int | None) -> tuple[list[np.ndarray], ...]:
    """(inputs, rows of note tokens, pitch of each row, aligned coordinates, owned rows) of
    every window."""
    tokens = adapter.tokenize(song)
    note = adapter.event_vocabulary().note
    coords = {k: np.asarray(v) for k, v in tokens.coords.items()}
    inputs, notes, pitch, aligned, owned = [], [], [], [], []
    for w in adapter.song_windows(tokens, stride):
        owned.append(np.asarray(w.owned, bool))
        is_note = coords["event_type"][w.token] == note
        inputs.append(np.asarray(w.inputs, np.int64))
        notes.append(is_note)
        pitch.append(np.where(is_note, coords["pitch"][w.token], -1).astype(np.int64))
        aligned.append(np.stack([w.token, *(coords[k][w.token] for k in ALIGNED)]))
    return inputs, notes, pitch, aligned, owned


def song_windows(adapter: ModelAdapter, name: str, song: Any, tokens: str,
                 stride: int | None) -> SongWindows:
    """The song's windows as the extract stage makes them, and the positions each owns."""
    codes, notes, pitch, aligned, owned = _windows(adapter, song, stride)
    keep = [np.flatnonzero(o & (n if tokens == "notes" else True))
            for o, n in zip(owned, notes, strict=True)]
    return SongWindows(name, song, codes, keep, [p[k] for p, k in zip(pitch, keep, strict=True)],
                       aligned)


def transposed(song: SongWindows, adapter: ModelAdapter, shift: int,
               stride: int | None) -> SongWindows | None:
    """The song with every pitch moved by ``shift``; None when a pitch leaves the model's range."""
    moved = adapter.transpose(song.song, shift)
    if moved is None:
        return None
    codes, _, pitch, aligned, _ = _windows(adapter, moved, stride)
    if len(codes) != len(song.codes) or any(
            a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(aligned, song.aligned, strict=True)):
        raise UserError(f"transposition: the windows of {song.name} changed under a shift of "
                        f"{shift} (beyond the pitches); cannot align tokens")
    return SongWindows(song.name, moved, codes, song.keep,
                       [p[k] for p, k in zip(pitch, song.keep, strict=True)], aligned)


def run_codes(adapter: ModelAdapter, hook: str, songs: list[SongWindows], encoders: list[Any],
              batch_size: int) -> list[np.ndarray]:
    """Float32 (tokens, units) of every kept token (songs, windows and positions in order)
    for each encoder: a function from activations (n, d_model) on the model's device to
    codes (the identity gives the activations)."""
    import torch

    items = [(c, k) for s in songs for c, k in zip(s.codes, s.keep, strict=True)]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    parts: list[list[Any]] = [[None] * len(items) for _ in encoders]
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        batch = adapter.pad([items[i][0] for i in idx])
        acts = adapter.run_with_hooks(batch, [hook])[hook]
        rows = [acts[row, torch.as_tensor(items[i][1], device=acts.device)].float()
                for row, i in enumerate(idx)]
        cuts = np.cumsum([0, *(len(r) for r in rows)])
        x = torch.cat(rows)
        for e, encode in enumerate(encoders):
            with torch.no_grad():
                codes_e = encode(x).float().cpu().numpy()
            for j, i in enumerate(idx):
                parts[e][i] = codes_e[cuts[j]: cuts[j + 1]]
    return [np.concatenate(p) if p else np.zeros((0, 0), np.float32) for p in parts]


def random_init_dictionary(d_in: int, d_sae: int, k: int | None, mean: Any, seed: int,
                           device: str) -> Any:
    """A dictionary of ``d_sae`` latents at initialisation: random unit encoder columns
    (seeded), decoder = encoder transposed, encoder bias 0, decoder bias ``mean``."""
    import torch

    from ..learners.dictionary import Dictionary

    g = torch.Generator().manual_seed(int(seed) + 1)
    w = torch.randn(d_in, d_sae, generator=g)
    w /= w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    model = Dictionary(d_in, d_sae, k=k)
    with torch.no_grad():
        model.W_enc.copy_(w)
        model.W_dec.copy_(w.T)
        model.b_dec.copy_(torch.as_tensor(mean, dtype=torch.float32))
    return model.to(device).eval()


class TranspositionAnalyzer(Analyzer):
    """Key-invariant and pitch-equivariant latents under transposition of held-out songs."""

    name = "transposition"
    description = ("Transpose held-out songs, rerun the model and dictionary, and classify "
                   "latents as key-invariant, pitch-equivariant or neither, against controls.")
    Config = TranspositionConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        from ..learners.io import read_config
        from .songsplit import dictionary_split

        cfg: TranspositionConfig = self.config
        adapter = ctx.adapter()
        if adapter is None or ctx.data_dir is None:
            raise UserError("transposition: needs the pipeline's model and data")
        dataset = ctx.open_dataset()
        assert dataset is not None
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {}
        for hook in ctx.dictionaries:
            split = dictionary_split(ctx.store.songs, read_config(ctx.dictionaries[hook]), 0.1,
                                     ctx.seed, f"dictionary {ctx.dictionaries[hook]}")
            names = [ctx.store.songs[i] for i in np.flatnonzero(split.test) if
                     ctx.store.songs[i] in dataset][: cfg.max_songs]
            if not names:
                raise UserError(f"transposition: none of the held-out songs of {hook} is in "
                                f"{ctx.data_dir}")
            result = self.analyze_hook(ctx, hook, adapter, dataset, names, cfg)
            result["split"] = split.note
            summary[hook] = write_hook(out, hook, result, cfg)
        (out / "summary.md").write_text(summary_markdown(summary, cfg), encoding="utf-8")
        return summary

    def analyze_hook(self, ctx: AnalysisContext, hook: str, adapter: ModelAdapter,
                     dataset: SongDataset, names: list[str],
                     cfg: TranspositionConfig) -> dict[str, Any]:
        """Statistics of one hook's dictionary (trained and controls) over every shift."""
        import scipy.sparse as sp
        import torch

        dictionary = ctx.load_dictionary(hook)
        songs, total = [], 0
        for name in names:
            song = song_windows(adapter, name, dataset.read(name), cfg.tokens, cfg.stride)
            if total and total + song.n_tokens > cfg.max_tokens:
                break
            songs.append(song)
            total += song.n_tokens
        n_control = min(dictionary.d_sae, cfg.control_latents)
        raw, a = run_codes(adapter, hook, songs, [lambda x: x, dictionary.encode_host],
                           cfg.batch_size)
        control = random_init_dictionary(dictionary.d_in, n_control, dictionary.k,
                                         raw.mean(0), ctx.seed, ctx.device)
        ac = control.encode_host(torch.from_numpy(raw)).numpy()
        a = sp.csr_matrix(a)
        encoders = [dictionary.encode_host, control.encode_host]
        pitch = np.concatenate([p for s in songs for p in s.pitch]).astype(np.int64)
        best, best_c = best_pitch(a, pitch), best_pitch(ac, pitch)
        stats, stats_c, used = [], [], {}
        rows = np.cumsum([0, *(s.n_tokens for s in songs)])
        for shift in cfg.shifts:
            moved = [(i, transposed(s, adapter, shift, cfg.stride)) for i, s in enumerate(songs)]
            kept = [(i, m) for i, m in moved if m is not None]
            used[shift] = (len(kept), len(songs))
            if not kept:
                continue
            sel = np.concatenate([np.arange(rows[i], rows[i + 1]) for i, _ in kept])
            b, bc = run_codes(adapter, hook, [m for _, m in kept], encoders, cfg.batch_size)
            stats.append(shift_stats(a[sel], sp.csr_matrix(b), best, shift))
            stats_c.append(shift_stats(ac[sel], bc, best_c, shift))
        if not stats:
            raise UserError(f"transposition: no held-out song of {hook} stays in MIDI range "
                            f"under the shifts {cfg.shifts}")
        fires = np.asarray((a > 0).sum(0)).reshape(-1)
        fires_c = (ac > 0).sum(0)
        thresholds = (cfg.invariant_threshold, cfg.equivariant_threshold)
        trained = classify(stats, fires, cfg.min_fires, *thresholds)
        random_init = classify(stats_c, fires_c, cfg.min_fires, *thresholds)
        shuffled = shuffled_label_counts(stats, best, fires, cfg.min_fires, *thresholds,
                                         cfg.n_perm, ctx.seed)
        return {"stats": stats, "trained": trained, "best_pitch": best, "songs": len(songs),
                "tokens": int(a.shape[0]), "shifts_used": used, "d_sae": dictionary.d_sae,
                "controls": {"random_init": random_init.counts(), "random_init_latents": n_control,
                             "random_init_median_invariance": _median(random_init.invariance),
                             "shuffled_labels": shuffled}}


def _median(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return round(float(np.median(x)), 4) if len(x) else None


def write_hook(out: Path, hook: str, r: dict[str, Any], cfg: TranspositionConfig) -> dict[str, Any]:
    """``<hook>.nc`` and ``<hook>.csv``; returns the hook's summary."""
    import xarray as xr

    stats, t = r["stats"], r["trained"]
    shifts = [s.shift for s in stats]
    ds = xr.Dataset(
        {"invariance": (("latent",), t.invariance), "equivariance": (("latent",), t.equivariance),
         "fires": (("latent",), t.fires), "class": (("latent",), [CLASSES[i] for i in t.label]),
         "best_pitch": (("latent",), r["best_pitch"]),
         "invariance_at": (("latent", "semitones"), np.stack([s.invariance for s in stats], 1)),
         "partner": (("latent", "semitones"), np.stack([s.partner for s in stats], 1)),
         "partner_corr": (("latent", "semitones"), np.stack([s.partner_corr for s in stats], 1)),
         "partner_match": (("latent", "semitones"), np.stack([s.match for s in stats], 1))},
        coords={"latent": np.arange(r["d_sae"]), "semitones": shifts},
        attrs={"hook": hook, "split": r["split"], "songs": r["songs"], "tokens": r["tokens"],
               "tokens_kind": cfg.tokens, "invariant_threshold": cfg.invariant_threshold,
               "equivariant_threshold": cfg.equivariant_threshold, "min_fires": cfg.min_fires})
    tmp = out / f".{hook}.nc.tmp"
    ds.to_netcdf(tmp)
    tmp.replace(out / f"{hook}.nc")
    with open(out / f"{hook}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["latent", "class", "invariance", "equivariance", "fires", "best_pitch",
                    *(f"partner@{k}" for k in shifts)])
        for i in range(r["d_sae"]):
            w.writerow([i, CLASSES[t.label[i]], _f(t.invariance[i]), _f(t.equivariance[i]),
                        int(t.fires[i]), int(r["best_pitch"][i]),
                        *(int(s.partner[i]) if s.match[i] else "" for s in stats)])
    return {"songs": r["songs"], "tokens": r["tokens"], "split": r["split"],
            "shifts": {str(k): f"{u}/{n} songs" for k, (u, n) in r["shifts_used"].items()},
            "counts": t.counts(), "median_invariance": _median(t.invariance),
            "controls": r["controls"]}


def _f(x: float) -> str:
    return f"{x:.4f}" if np.isfinite(x) else ""


def summary_markdown(summary: dict[str, Any], cfg: TranspositionConfig) -> str:
    lines = ["# transposition", "",
             f"Held-out songs transposed by {cfg.shifts} semitones; codes compared token by "
             f"token ({cfg.tokens} tokens). Invariant: mean correlation with itself >= "
             f"{cfg.invariant_threshold:g}. Equivariant: mean correlation with a partner whose "
             f"best pitch moves by k >= {cfg.equivariant_threshold:g}. Rare: fewer than "
             f"{cfg.min_fires} firings.", ""]
    for hook, s in summary.items():
        c = s["controls"]
        lines += [f"## {hook}", "", f"Split: {s['split']}.", "",
                  f"{s['songs']} songs, {s['tokens']} tokens; shifts used: "
                  + ", ".join(f"{k}: {v}" for k, v in s["shifts"].items()) + ".", "",
                  "| latents | " + " | ".join(CLASSES) + " | median invariance |",
                  "|---|" + "---|" * (len(CLASSES) + 1),
                  "| trained | " + " | ".join(str(s["counts"][k]) for k in CLASSES)
                  + f" | {s['median_invariance']} |",
                  f"| random-init ({c['random_init_latents']}) | "
                  + " | ".join(str(c["random_init"][k]) for k in CLASSES)
                  + f" | {c['random_init_median_invariance']} |",
                  "| trained, shuffled pitch labels (mean) | "
                  + " | ".join(f"{c['shuffled_labels'][k]:.1f}" for k in CLASSES) + " | |", ""]
    return "\n".join(lines)
