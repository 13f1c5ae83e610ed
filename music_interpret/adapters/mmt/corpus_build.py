"""Build the ``--corpus all`` dataset: run the tasks of :mod:`.corpus` in parallel, name,
de-duplicate and split the songs, and write the dataset with its manifest and statistics.

Output (``<out>/<dataset>_notes/``): the demo's layout (``notes/<name>.npy|.csv``,
``encoding.json``, ``names.txt``, ``{train,valid,test}-names.txt``, ``sources.json``) plus
``corpus_stats.json``. Songs are in task order (corpus path, then tune order in the file);
a name is ``<sub-corpus>_<path stem>[-<tune number>]`` lower-cased, every run of other
characters than ``a-z0-9_-`` made ``_``; a name already taken gets ``-2``, ``-3``, ...
in that order. A song whose note array equals an earlier one's is skipped ("duplicate").

``sources.json`` records per song its corpus path, abc tune number, part -> program (and
the rule that chose it), whether repeats were expanded, notes, beats, MMT tokens, split and
split group; ``skipped`` lists every file or tune left out with a category and reason.
It is also the marker that lets a later build replace the folder.

Splits are by group: songs sharing a work key (movements of one work, chorales of one
cantata, sections of one mass, see :func:`.corpus._work_key`) or a melody key (the same
tune in another collection or key, :func:`.corpus.melody_key`) form one group; groups
are ranked by ``sha256("<seed>:<first name>")`` and fill test, then valid (``round(0.1 n)``
songs each, possibly one group over), the rest is train. Output bytes depend only on the
options and the corpus, not on the worker count or the order in which tasks finish. The
time limit counts CPU seconds, so the machine's load does not decide what times out (the
slowest tasks, whole-quartet files, need a few minutes of CPU; the default limit is 600 s).
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from . import representation
from .corpus import (
    Converted,
    Skip,
    SkipSong,
    Task,
    convert_task,
    corpus_tasks,
    melody_key,
    notes_digest,
    subcorpus_instruments,
)
from .dataset import SPLITS
from .music21_read import (
    _DATASET_NAME,
    MAX_BEATS,
    MIN_BEATS,
    MIN_NOTES,
    RESOLUTION,
    SPLIT_FRACTION,
    _music21,
    corpus_root,
)
from .pool import PoolStats, run_tasks
from .writing import check_replaceable, write_dataset

GENERATOR = "music_interpret.adapters.mmt.corpus"
STATS_FILE = "corpus_stats.json"
DEFAULT_TIME_LIMIT = 600.0


@dataclass(frozen=True)
class CorpusSong:
    """A kept song: its name, task and converted notes."""

    name: str
    task: Task
    song: Converted
    tokens: int

    @property
    def notes(self) -> np.ndarray:
        return self.song.notes


@dataclass(frozen=True)
class CorpusBuildResult:
    """What :func:`build_corpus` wrote and what it cost."""

    path: Path
    songs: tuple[CorpusSong, ...]
    splits: dict[str, tuple[str, ...]]
    skipped: tuple[Skip, ...]
    stats: dict[str, Any]
    seconds: float
    main_peak_rss_mib: float
    pool: PoolStats = field(default_factory=PoolStats)


def classify(exc: BaseException) -> tuple[str, str]:
    """(category, detail) of an exception raised by :func:`.corpus.convert_task`."""
    if isinstance(exc, SkipSong):
        return exc.category, exc.detail
    text = " ".join(str(exc).split())[:160]
    return "error", f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- names, keys


def base_name(task: Task) -> str:
    """``<sub-corpus>_<stem>[-<tune>]`` flattened to ``[a-z0-9_-]``."""
    stem = task.corpus_path.rsplit(".", 1)[0]
    name = _safe(stem.replace("/", "_"))
    return f"{name}-{_safe(task.tune)}" if task.tune is not None else name


def _safe(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower())


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    taken.add(candidate)
    return candidate


def collect(
    tasks: Sequence[Task], outcomes: Sequence[Any]
) -> tuple[list[CorpusSong], list[Skip]]:
    """Kept songs (named, de-duplicated) and skipped tunes, in task order."""
    songs: list[CorpusSong] = []
    skips: list[Skip] = []
    taken: set[str] = set()
    first_by_digest: dict[str, str] = {}
    for task, outcome in zip(tasks, outcomes, strict=True):
        if not outcome.ok:
            skips.append(Skip(task.corpus_path, *outcome.error, task.tune, task.ordinal))
            continue
        digest = notes_digest(outcome.value.notes)
        if digest in first_by_digest:
            detail = f"notes identical to {first_by_digest[digest]}"
            skips.append(Skip(task.corpus_path, "duplicate", detail, task.tune, task.ordinal))
            continue
        name = _unique(base_name(task), taken)
        first_by_digest[digest] = name
        tokens = len(representation.encode_notes(outcome.value.notes))
        songs.append(CorpusSong(name, task, outcome.value, tokens))
    return songs, skips


def split_groups(songs: Sequence[CorpusSong]) -> dict[str, str]:
    """Song name -> group (the first name of its group): shared work or melody keys."""
    parent = list(range(len(songs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, song in enumerate(songs):
        keys = [f"work:{song.task.work}"] if song.task.work else []
        melody = melody_key(song.notes)
        keys += [f"melody:{melody}"] if melody else []
        for key in keys:
            if key in owner:
                a, b = find(owner[key]), find(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[key] = i
    return {song.name: songs[find(i)].name for i, song in enumerate(songs)}


def split_by_group(
    names: Sequence[str], groups: dict[str, str], seed: int = 0
) -> dict[str, tuple[str, ...]]:
    """Whole groups, ranked by ``sha256(seed:group)``, fill test then valid; lists keep order.

    With one song per group this equals :func:`.demo_data.split_names`.
    """
    n = len(names)
    n_held = max(1, int(n * SPLIT_FRACTION + 0.5)) if n >= 3 else 0
    sizes = Counter(groups[name] for name in names)
    ranked = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    split_of_group: dict[str, str] = {}
    counts = {"test": 0, "valid": 0}
    for group in ranked:
        split = next((s for s in ("test", "valid") if counts[s] < n_held), "train")
        split_of_group[group] = split
        if split != "train":
            counts[split] += sizes[group]
    return {s: tuple(x for x in names if split_of_group[groups[x]] == s) for s in SPLITS}


# --------------------------------------------------------------------------- statistics


def corpus_stats(
    songs: Sequence[CorpusSong],
    skips: Sequence[Skip],
    splits: dict[str, tuple[str, ...]],
    groups: dict[str, str],
) -> dict[str, Any]:
    """Songs, notes, MMT tokens and instruments per sub-corpus and in total (deterministic)."""
    by_sub: dict[str, list[CorpusSong]] = defaultdict(list)
    for song in songs:
        by_sub[song.task.subcorpus].append(song)
    skipped: dict[str, Counter] = defaultdict(Counter)
    for skip in skips:
        skipped[skip.corpus_path.split("/", 1)[0]][skip.category] += 1
    rows = {
        sub: _row(by_sub.get(sub, []), skipped.get(sub, Counter()))
        for sub in sorted(set(by_sub) | set(skipped), key=str.lower)
    }
    token_of = {song.name: song.tokens for song in songs}
    group_sizes = Counter(groups.values())
    return {
        "generator": GENERATOR,
        "token_count": "len(representation.encode_notes(notes)): start, instruments, "
        "start-of-notes, notes at beat <= 1024 with a known program, end",
        "total": _row(songs, sum(skipped.values(), Counter())),
        "splits": {
            s: {"songs": len(names), "tokens": sum(token_of[n] for n in names)}
            for s, names in splits.items()
        },
        "split_groups": {
            "groups": len(group_sizes),
            "songs_in_shared_groups": sum(v for v in group_sizes.values() if v > 1),
            "largest": max(group_sizes.values(), default=0),
        },
        "subcorpora": rows,
    }


def _row(songs: Sequence[CorpusSong], skipped: Counter) -> dict[str, Any]:
    programs = {p for song in songs for p in np.unique(song.notes[:, 4]).tolist()}
    return {
        "songs": len(songs),
        "notes": int(sum(len(song.notes) for song in songs)),
        "tokens": int(sum(song.tokens for song in songs)),
        "instruments": subcorpus_instruments(programs),
        "skipped": int(sum(skipped.values())),
        "skipped_by_category": dict(sorted(skipped.items())),
    }


def stats_table(stats: dict[str, Any]) -> str:
    """A Markdown table of ``corpus_stats.json``: one row per sub-corpus, then the total."""
    lines = [
        "| sub-corpus | songs | notes | MMT tokens | instruments | skipped |",
        "|---|---:|---:|---:|---|---:|",
    ]
    rows = [*stats["subcorpora"].items(), ("**total**", stats["total"])]
    for sub, row in rows:
        instruments = ", ".join(row["instruments"]) if sub != "**total**" else (
            f"{len(row['instruments'])} distinct")
        lines.append(f"| {sub} | {row['songs']:,} | {row['notes']:,} | {row['tokens']:,} | "
                     f"{instruments} | {row['skipped']:,} |")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- build


def build_corpus(
    out: Path,
    dataset_name: str = "music21",
    root: Path | None = None,
    include: Sequence[str] | None = None,
    workers: int = 2,
    time_limit: float = DEFAULT_TIME_LIMIT,
    seed: int = 0,
    progress: bool | None = None,
) -> CorpusBuildResult:
    """Convert the whole corpus (or the ``include`` globs) and write ``<out>/<name>_notes``.

    ``time_limit``: CPU seconds per task (5x that of wall clock, see :mod:`.pool`).
    ``progress``: a tqdm bar on stderr (None: only when stderr is a terminal).
    """
    if not _DATASET_NAME.fullmatch(dataset_name):
        raise UserError(f"dataset name {dataset_name!r} must match [a-z0-9][a-z0-9_-]*")
    if workers < 1 or time_limit <= 0:
        raise UserError(f"--workers must be >= 1 and --time-limit > 0 (got {workers}, "
                        f"{time_limit})")  # fmt: skip
    final = out / f"{dataset_name}_notes"
    check_replaceable(final, GENERATOR)
    started = time.perf_counter()
    root = Path(root) if root is not None else corpus_root()
    tasks, file_skips = corpus_tasks(root, include)
    if not tasks:
        raise UserError(f"no corpus file to read under {root} (include: {include or 'all'})")
    outcomes, pool_stats = _run(tasks, workers, time_limit, progress)
    songs, song_skips = collect(tasks, outcomes)
    if not songs:
        raise UserError(f"no song qualified for dataset {dataset_name!r}; nothing written")
    skips = sorted([*file_skips, *song_skips], key=lambda s: (s.corpus_path, s.ordinal))
    names = [song.name for song in songs]
    groups = split_groups(songs)
    splits = split_by_group(names, groups, seed)
    stats = corpus_stats(songs, skips, splits, groups)
    sources = _sources(songs, skips, splits, groups, seed, include, time_limit)
    extra = {STATS_FILE: json.dumps(stats, indent=2) + "\n"}
    write_dataset(final, GENERATOR, [(s.name, s.notes) for s in songs], splits, sources, extra)
    return CorpusBuildResult(
        path=final,
        songs=tuple(songs),
        splits=splits,
        skipped=tuple(skips),
        stats=stats,
        seconds=time.perf_counter() - started,
        main_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        pool=pool_stats,
    )


def _run(
    tasks: Sequence[Task], workers: int, time_limit: float, progress: bool | None
) -> tuple[list[Any], PoolStats]:
    from tqdm import tqdm

    disable = None if progress is None else not progress
    with tqdm(total=len(tasks), unit="task", disable=disable, mininterval=2.0,
              desc="music21 corpus", dynamic_ncols=True) as bar:  # fmt: skip
        update: Callable[[int], object] = bar.update
        return run_tasks(convert_task, tasks, classify, workers, time_limit, progress=update)


def _sources(
    songs: Sequence[CorpusSong],
    skips: Sequence[Skip],
    splits: dict[str, tuple[str, ...]],
    groups: dict[str, str],
    seed: int,
    include: Sequence[str] | None,
    time_limit: float,
) -> dict[str, Any]:
    version = _music21().__version__
    split_of = {name: split for split, names in splits.items() for name in names}
    return {
        "generator": GENERATOR,
        "corpus": "music21 bundled corpus (--corpus all)",
        "music21_version": version,
        "include": list(include) if include else None,
        "time_limit_cpu_s": time_limit,
        "resolution": RESOLUTION,
        "filters": {"min_beats": MIN_BEATS, "max_beats": MAX_BEATS, "min_notes": MIN_NOTES},
        "split": {"method": "groups by sha256(seed:group) rank", "seed": seed,
                  "fraction": SPLIT_FRACTION},  # fmt: skip
        "songs": {song.name: _song_record(song, split_of, groups) for song in songs},
        "skipped": [skip.to_json() for skip in skips],
    }


def _song_record(song: CorpusSong, split_of: dict[str, str], groups: dict) -> dict[str, Any]:
    record: dict[str, Any] = {"corpus_path": song.task.corpus_path}
    if song.task.tune is not None:
        record["tune"] = song.task.tune
    record.update(
        parts=[{"part": n, "program": p, "rule": r} for n, p, r in song.song.parts],
        repeats=song.song.repeats,
        meters=[list(m) for m in song.song.meters],
        notes=len(song.notes),
        beats=int(song.notes[-1, 0]) + 1,
        tokens=song.tokens,
        split=split_of[song.name],
        group=groups[song.name],
    )
    return record
