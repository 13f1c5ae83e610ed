"""The evaluation data of the ``causal`` analyzer: model windows of held-out songs, batched.

Every window keeps three token masks (B, T):

* ``eligible``: tokens whose activation an ablation may change: real tokens, or only note
  tokens when the dictionary was trained on a store of note tokens (``events: notes``);
* ``scored``: positions t whose next-token prediction counts: t is owned by the window
  (each token of a song is owned by exactly one window, so overlapping windows count no
  token twice) and token t+1 is real;
* ``selected``: the scored positions of the selected kind (note tokens with
  ``tokens: notes``, as ``feature_token`` selects them), where firing is counted.

``group`` gives each row's song (an index into ``songs``): bootstrap intervals resample
songs. Which rows are note tokens comes from the tokens' coordinates in the adapter's
event vocabulary (``ModelAdapter.tokenize``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..interfaces import Batch
from ..learners.holdout import holdout_songs

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter

#: one window: (inputs (L, ...), owned (L,), song index, note tokens (L,))
WindowItem = tuple[np.ndarray, np.ndarray, int, np.ndarray]


@dataclass
class EvalBatch:
    """One padded batch and its masks (see the module doc)."""

    batch: Batch
    eligible: torch.Tensor
    scored: torch.Tensor
    selected: torch.Tensor
    group: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.batch.codes.shape[0])


@dataclass
class EvalData:
    """Batches of windows of held-out songs."""

    batches: list[EvalBatch]
    songs: list[str]
    windows: list[np.ndarray] = field(default_factory=list)  # inputs of each window, song order
    window_song: list[int] = field(default_factory=list)
    window_notes: list[np.ndarray] = field(default_factory=list)  # note rows of each window

    @property
    def n_groups(self) -> int:
        return len(self.songs)

    @property
    def n_scored(self) -> int:
        return int(sum(int(b.scored.sum()) for b in self.batches))

    @property
    def n_selected(self) -> int:
        return int(sum(int(b.selected.sum()) for b in self.batches))


def build_data(windows: Sequence[WindowItem], songs: Sequence[str],
               batch_size: int, *, notes_only_patch: bool, tokens: str) -> EvalData:
    """Batches of ``(inputs (L, ...), owned (L,), song index, note rows (L,))`` windows,
    longest first."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [windows[i] for i in order[start : start + batch_size]]
        t = max(len(c) for c, _, _, _ in rows)
        codes = np.zeros((len(rows), t, *rows[0][0].shape[1:]), np.int64)
        mask = np.zeros((len(rows), t), bool)
        owned = np.zeros((len(rows), t), bool)
        note = np.zeros((len(rows), t), bool)
        for j, (c, o, _, n) in enumerate(rows):
            codes[j, : len(c)], mask[j, : len(c)], owned[j, : len(c)] = c, True, o
            note[j, : len(c)] = n
        scored = owned & mask & np.concatenate([mask[:, 1:], np.zeros((len(rows), 1), bool)], 1)
        selected = scored & note if tokens == "notes" else scored
        eligible = mask & note if notes_only_patch else mask
        group = np.asarray([s for _, _, s, _ in rows], np.int64)
        batch = Batch(torch.from_numpy(codes), torch.from_numpy(mask), song=list(group.tolist()))
        batches.append(EvalBatch(batch, torch.from_numpy(eligible), torch.from_numpy(scored),
                                 torch.from_numpy(selected), group))
    return EvalData(batches, list(songs), [w[0] for w in windows], [w[2] for w in windows],
                    [w[3] for w in windows])


def heldout_names(config: dict[str, Any], store_songs: Sequence[str]) -> list[str]:
    """The dictionary's held-out songs: ``training.holdout_songs`` of its ``config.json``, else
    recomputed from ``training.holdout_fraction`` and ``training.seed`` over the store's songs
    (:mod:`music_interpret.learners.holdout`, as the train stage splits them)."""
    training = config.get("training") or {}
    names = training.get("holdout_songs")
    if isinstance(names, list):
        return [str(n) for n in names]
    fraction = float(training.get("holdout_fraction") or 0.0)
    seed = int(training.get("seed") or 0)
    return [store_songs[i] for i in holdout_songs(store_songs, fraction, seed)]


def heldout_data(adapter: ModelAdapter, read: Callable[[str], Any], names: Sequence[str], *,
                 max_windows: int, max_tokens: int, batch_size: int, notes_only_patch: bool,
                 tokens: str) -> EvalData:
    """Every window of ``names`` in order, until ``max_windows`` windows / ``max_tokens`` tokens
    (the adapter's ``tokenize`` and ``song_windows`` give the windows and which tokens each
    one owns)."""
    wins: list[WindowItem] = []
    used: list[str] = []
    n_tokens = 0
    note = adapter.event_vocabulary().note
    for name in names:
        song = adapter.tokenize(read(name))
        events = np.asarray(song.coords["event_type"])
        for w in adapter.song_windows(song):
            if len(wins) >= max_windows or (wins and n_tokens + len(w.inputs) > max_tokens):
                return build_data(wins, used, batch_size, notes_only_patch=notes_only_patch,
                                  tokens=tokens)
            if len(w.inputs) < 2:
                continue
            if not used or used[-1] != name:
                used.append(name)
            wins.append((np.asarray(w.inputs, np.int64), np.asarray(w.owned, bool), len(used) - 1,
                         events[w.token] == note))
            n_tokens += len(w.inputs)
    return build_data(wins, used, batch_size, notes_only_patch=notes_only_patch, tokens=tokens)
