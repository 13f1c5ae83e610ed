"""The ``top_examples`` analyzer: each latent's most activating tokens, in musical context.

Streams the store block by block through each dictionary, keeping a running top-N
per latent (never a dense tokens x latents matrix). Writes, per hook point, into
``<out>/<hook>/``:

* ``top_examples.nc``: (latent, rank) song, song_token, token, activation, event_type,
  beat, position, pitch, duration, instrument; per latent max_activation, density,
  rendered; the song table ``song_name`` (songs)
* ``index.json``: the rendered latents (why each was chosen) and their files
* for each rendered latent: ``latent_<i>.png`` (piano rolls of the first examples at
  distinct places; ``shown`` in ``index.json`` gives their ranks),
  ``latent_<i>_ex<r>.mid`` (one playable file per example) and ``latent_<i>.txt``

Rendered latents: ``latents`` when given, else every finding of ``feature_token`` (the
latents that beat their controls, strongest margin first), then the best other live
latents up to ``render_latents`` (by ``monosemanticity`` x ``best_score`` from
``feature_token/<hook>.nc`` when that exists, else by maximum activation), plus a random
``render_sample`` of the other live latents. The report gives a page to exactly these.

Rendering runs on ``render_workers`` processes (``spawn``; default: the usable CPUs, at
most 4, once there are ``SPAWN_FROM`` (32) latents to draw, else in this process; 1: in
this process). The main process reads the songs and cuts the contexts;
the workers draw and write the files. Files and ``index.json`` are the same either way.
A script that runs it with workers needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import UserError
from ..interfaces import Analyzer

if TYPE_CHECKING:
    from ..doors import EventVocabulary, NoteTable
    from ..interfaces import ModelAdapter, SongDataset, StoreReader
    from .context import AnalysisContext
    from .examples_render import LatentJob

SPAWN_FROM = 32  # render_workers: null draws fewer latents than this in the main process
COORDS = ("song", "song_token", "event_type", "beat", "position", "pitch", "duration", "instrument")


@dataclass
class TopExamplesConfig:
    """Options of ``top_examples``."""

    n_examples: int = 8
    context_beats: float = 8.0
    render_latents: int = 64
    render_sample: int = 16
    render_examples: int = 4
    latents: list[int] = field(default_factory=list)
    rank_by: Literal["auto", "monosemanticity", "max_activation"] = "auto"
    tempo_bpm: float = 90.0
    block_tokens: int = 16_384
    render_workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_examples", "render_examples", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.render_workers is not None and self.render_workers < 1:
            raise ValueError(f"render_workers must be positive or null, got {self.render_workers}")
        for name in ("render_latents", "render_sample"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.context_beats <= 0 or self.tempo_bpm <= 0:
            raise ValueError("context_beats and tempo_bpm must be positive")


@dataclass
class TopK:
    """Running top-N per latent: ``values``/``tokens`` (N, d_sae), sorted descending."""

    values: Any
    tokens: Any
    active: Any
    seen: int = 0


def running_top(encode: Any, blocks: Iterator[tuple[int, np.ndarray]], d_sae: int, n: int,
                device: str = "cpu") -> TopK:
    """Top-``n`` activations of every latent over ``(offset, activations)`` blocks."""
    import torch

    top = TopK(torch.full((n, d_sae), -torch.inf, device=device),
               torch.full((n, d_sae), -1, dtype=torch.int64, device=device),
               torch.zeros(d_sae, dtype=torch.int64, device=device))
    with torch.no_grad():
        for offset, x in blocks:
            f = encode(torch.from_numpy(x).to(device))
            top.active += (f > 0).sum(0)
            top.seen += len(f)
            bv, bi = f.topk(min(n, len(f)), dim=0)
            values = torch.cat([top.values, bv])
            tokens = torch.cat([top.tokens, bi + offset])
            top.values, pos = values.topk(n, dim=0)
            top.tokens = tokens.gather(0, pos)
    return top


class TopExamplesAnalyzer(Analyzer):
    """Each latent's top-activating tokens with piano rolls, MIDI and text."""

    name = "top_examples"
    description = "Top-activating tokens per latent, with piano rolls, MIDI files and text dumps."
    Config = TopExamplesConfig

    def analyze(self, ctx: AnalysisContext) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for hook in ctx.dictionaries:
            out = Path(ctx.out_dir) / hook
            out.mkdir(parents=True, exist_ok=True)
            summary[hook] = self.analyze_hook(ctx, hook, out)
        return summary

    def analyze_hook(self, ctx: AnalysisContext, hook: str, out: Path) -> dict[str, Any]:
        """Top examples of one dictionary, written into ``out``."""
        cfg: TopExamplesConfig = self.config
        dictionary = ctx.load_dictionary(hook)
        info = ctx.store
        top = running_top(dictionary.encode, _blocks(info, hook, cfg.block_tokens, ctx.max_tokens),
                          int(dictionary.config["d_sae"]), cfg.n_examples, ctx.device)
        values = top.values.cpu().numpy().astype(np.float32)
        tokens = top.tokens.cpu().numpy()
        valid = np.isfinite(values) & (values > 0)
        tokens = np.where(valid, tokens, -1)
        values = np.where(valid, values, 0.0).astype(np.float32)
        density = top.active.cpu().numpy() / max(top.seen, 1)
        coords = _gather_coords(info, tokens)
        ds = _dataset(values.T, tokens.T, {k: v.T for k, v in coords.items()}, density, info, hook)
        ranking, ranked_by = self._ranking(ctx, hook, ds)
        findings = _feature_token_findings(Path(ctx.out_dir).parent / "feature_token" / f"{hook}.nc",
                                           ds.sizes["latent"])
        chosen = self._choose(ranking, ds.max_activation.values, ctx.seed, findings)
        ds["rendered"] = ("latent", np.isin(np.arange(ds.sizes["latent"]), [c[0] for c in chosen]))
        ds.to_netcdf(out / "top_examples.nc")
        rendered = self._render(ctx, hook, ds, chosen, out)
        index = {"hook": hook, "ranked_by": ranked_by, "n_examples": cfg.n_examples,
                 "context_beats": cfg.context_beats, "tokens": int(top.seen), "latents": rendered}
        (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        return {"tokens": int(top.seen), "live_latents": int((ds.max_activation > 0).sum()),
                "rendered": len(rendered), "ranked_by": ranked_by}

    # -- choosing latents ---------------------------------------------------------------

    def _ranking(self, ctx: AnalysisContext, hook: str, ds: Any) -> tuple[np.ndarray, str]:
        """A score per latent (higher: render first) and its name."""
        rank_by = self.config.rank_by
        if rank_by in ("auto", "monosemanticity"):
            mono = _feature_token_scores(Path(ctx.out_dir).parent / "feature_token" / f"{hook}.nc",
                                         ds.sizes["latent"])
            if mono is not None:
                return mono, "monosemanticity*best_score"
        return ds.max_activation.values.astype(np.float64), "max_activation"

    def _choose(self, score: np.ndarray, max_act: np.ndarray, seed: int,
                findings: list[int] | None = None) -> list[tuple[int, str]]:
        """(latent, reason) pairs: explicit list, or the findings, the best other live
        latents and a sample of the rest."""
        cfg: TopExamplesConfig = self.config
        n = len(max_act)
        if cfg.latents:
            return [(int(i), "requested") for i in cfg.latents if 0 <= i < n]
        live = np.flatnonzero(max_act > 0)
        found = [int(i) for i in (findings or []) if 0 <= i < n and max_act[i] > 0]
        order = [int(i) for i in live[np.argsort(-np.nan_to_num(score[live], nan=-np.inf), kind="stable")]
                 if int(i) not in set(found)]
        best = order[: max(0, cfg.render_latents - len(found))]
        rest = order[len(best):]
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(rest, min(cfg.render_sample, len(rest)), replace=False)) if rest else []
        return ([(i, "finding") for i in found] + [(int(i), "top") for i in best]
                + [(int(i), "sample") for i in sample])

    # -- rendering ----------------------------------------------------------------------

    def _render(self, ctx: AnalysisContext, hook: str, ds: Any, chosen: list[tuple[int, str]],
                out: Path) -> list[dict[str, Any]]:
        """Draw the chosen latents (in ``chosen`` order); their ``index.json`` entries."""
        from .examples_render import default_workers, render_all

        cfg: TopExamplesConfig = self.config
        auto = default_workers() if len(chosen) >= SPAWN_FROM else 1  # starting workers costs seconds
        workers = min(cfg.render_workers or auto, max(len(chosen), 1))
        jobs = self._jobs(ctx, hook, ds, ctx.progress(chosen, desc=f"top_examples {hook}",
                                                       unit="latent"), out)
        return render_all(jobs, workers)

    def _jobs(self, ctx: AnalysisContext, hook: str, ds: Any, chosen: Iterable[tuple[int, str]],
              out: Path) -> Iterator[LatentJob]:
        """What drawing each chosen latent needs, gathered here (songs read once each)."""
        from .examples_render import LatentJob, context_for

        cfg: TopExamplesConfig = self.config
        songs = _SongCache(ctx)
        names = [str(s) for s in ds.song_name.values]
        for latent, reason in chosen:
            examples = _examples(ds, latent, names, ctx.vocabulary)
            contexts = [songs.context(ex.song, ex.song_token, cfg.context_beats, context_for)
                        for ex in examples]
            shown = [ex.rank for ex in _distinct(examples, contexts)[: cfg.render_examples]]
            entry = {"latent": latent, "reason": reason, "shown": shown,
                     "max_activation": float(ds.max_activation[latent]),
                     "density": float(ds.density[latent])}
            yield LatentJob(hook, out, examples, contexts, shown, cfg.tempo_bpm, entry)


# -- helpers ------------------------------------------------------------------------------


def _blocks(info: StoreReader, hook: str, block_tokens: int,
            max_tokens: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, activations) blocks over every shard, up to ``max_tokens``."""
    return info.iter_blocks(hook, block_tokens, max_tokens)


def _gather_coords(info: StoreReader, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Coordinates of the global token indices ``tokens`` (-1 stays -1), shard by shard."""
    return info.gather_coords(tokens, COORDS)


def _dataset(values: np.ndarray, tokens: np.ndarray, coords: dict[str, np.ndarray],
             density: np.ndarray, info: StoreReader, hook: str) -> Any:
    import xarray as xr

    dims = ("latent", "rank")
    n_latents, n = values.shape
    data = {"activation": (dims, values), "token": (dims, tokens.astype(np.int64)),
            **{k: (dims, v) for k, v in coords.items()},
            "max_activation": ("latent", values[:, 0]),
            "density": ("latent", density.astype(np.float64)),
            "song_name": ("songs", np.asarray(info.songs, dtype=object))}
    ds = xr.Dataset(data, coords={"latent": np.arange(n_latents), "rank": np.arange(n)})
    vocabulary = info.vocabulary
    ds.attrs.update(hook=hook, store=str(info.path), store_id=info.store_id,
                    description="top-activating tokens per latent; token -1: fewer active tokens",
                    event_names=json.dumps(list(vocabulary.events)),
                    instrument_names=json.dumps(list(vocabulary.instruments)),
                    note_event=vocabulary.note)
    return ds


def _feature_token_scores(path: Path, n_latents: int) -> np.ndarray | None:
    """monosemanticity x best_score per latent from feature_token's output, when present."""
    if not path.exists():
        return None
    import xarray as xr

    try:
        with xr.open_dataset(path) as ds:
            if "monosemanticity" not in ds or ds["monosemanticity"].sizes.get("latent") != n_latents:
                return None
            score = np.asarray(ds["monosemanticity"].values, np.float64)
            if "best_score" in ds:  # a latent that is pure but barely above chance ranks low
                score = score * np.asarray(ds["best_score"].values, np.float64)
            return score
    except (OSError, ValueError):
        return None


def _feature_token_findings(path: Path, n_latents: int) -> list[int]:
    """The latents ``feature_token`` reports as findings, strongest margin first."""
    if not path.exists():
        return []
    import xarray as xr

    try:
        with xr.open_dataset(path) as ds:
            if "finding" not in ds or ds["finding"].sizes.get("latent") != n_latents:
                return []
            found = np.flatnonzero(ds["finding"].values > 0)
            margin = np.asarray(ds["finding_margin"].values, np.float64)[found]
            return [int(i) for i in found[np.argsort(-np.nan_to_num(margin, nan=0.0), kind="stable")]]
    except (OSError, ValueError):
        return []


def _distinct(examples: list[Any], contexts: list[Any]) -> list[Any]:
    """Examples at distinct places: later ones within a beat of an earlier one (same song,
    e.g. another note of the same chord) go to the end."""
    seen: list[tuple[str, float]] = []
    first, later = [], []
    for ex, cx in zip(examples, contexts, strict=True):
        onset = cx.onset if cx is not None else float(ex.song_token)
        if any(song == ex.song and abs(onset - o) < 1.0 for song, o in seen):
            later.append(ex)
        else:
            first.append(ex)
            seen.append((ex.song, onset))
    return first + later


def _examples(ds: Any, latent: int, names: list[str], vocabulary: EventVocabulary) -> list[Any]:
    from .examples_render import Example

    row = ds.isel(latent=latent)
    out = []
    for r in range(row.sizes["rank"]):
        if int(row.token[r]) < 0:
            break
        song = int(row.song[r])
        out.append(Example(latent, r, names[song] if 0 <= song < len(names) else f"song-{song}",
                           int(row.song_token[r]), float(row.activation[r]),
                           int(row.event_type[r]), int(row.beat[r]), int(row.position[r]),
                           int(row.pitch[r]), int(row.instrument[r]), vocabulary))
    return out


class _SongCache:
    """Songs of the dataset, tokenized and rendered to notes once each (None when not there)."""

    def __init__(self, ctx: AnalysisContext) -> None:
        self.dataset: SongDataset | None = None
        self.adapter: ModelAdapter | None = None
        try:
            self.dataset = ctx.open_dataset("all")  # every song, whatever the split
            self.adapter = ctx.data_adapter() if self.dataset is not None else None
        except (UserError, NotImplementedError):
            self.dataset = None
        self.songs: dict[str, NoteTable | None] = {}

    def context(self, name: str, song_token: int, context_beats: float, fn: Any) -> Any:
        song = self.song(name)
        return fn(song, song_token, context_beats) if song is not None else None

    def song(self, name: str) -> NoteTable | None:
        if name not in self.songs:
            ok = self.dataset is not None and self.adapter is not None and name in self.dataset
            self.songs[name] = self.adapter.render_notes(self.adapter.tokenize(self.dataset.read(name))) \
                if ok else None  # type: ignore[union-attr]
        return self.songs[name]
