"""Reading music21's bundled corpus into MMT note rows: what the demo build
(:mod:`.demo_data`) and the corpus build (:mod:`.corpus`, :mod:`.corpus_build`) share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError

RESOLUTION = 12
MIN_BEATS, MAX_BEATS, MIN_NOTES = 40, 8000, 50
SPLIT_FRACTION = 0.1
_DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _music21() -> Any:
    try:
        import music21
    except ImportError as exc:  # music21 comes with the [demo] extra
        raise UserError(f"building demo data needs music21, which is not installed ({exc}); "
                        "install it with: pip install 'music-interpret[demo]'") from None
    return music21


def corpus_root() -> Path:
    """The folder of music21's bundled corpus."""
    return Path(_music21().common.getCorpusFilePath())


def score_notes(score: Any, programs: Sequence[int]) -> tuple[np.ndarray, int]:
    """Sorted unique rows (beat, position, pitch, duration, program) of ``score``, unshifted.

    ``programs[i]`` is the program of ``score.parts[i]``. Grace notes and chord symbols are
    skipped. Also returns the end tick (latest note offset), which MMT's length filter uses.
    """
    harmony = _music21().harmony.Harmony  # chord symbols: muspy ignores <harmony>
    rows: set[tuple[int, int, int, int, int]] = set()
    end_tick = 0
    for part, program in zip(score.parts, programs, strict=True):
        for element in part.stripTies().flatten().notes:
            if element.duration.isGrace or isinstance(element, harmony):
                continue
            onset = round(Fraction(element.offset) * RESOLUTION)
            duration = max(1, round(Fraction(element.duration.quarterLength) * RESOLUTION))
            end_tick = max(end_tick, onset + duration)
            beat, position = divmod(onset, RESOLUTION)
            for pitch in element.pitches:
                rows.add((beat, position, int(pitch.midi), duration, int(program)))
    notes = np.array(sorted(rows), dtype=np.int64).reshape(-1, 5)
    return notes, end_tick


def mmt_filter(notes: np.ndarray, end_tick: int) -> tuple[np.ndarray | None, str]:
    """Apply MMT's length filters and shift the first beat to 0; (None, reason) if dropped."""
    if end_tick < MIN_BEATS * RESOLUTION:
        return None, f"shorter than {MIN_BEATS} beats"
    if end_tick > MAX_BEATS * RESOLUTION:
        return None, f"longer than {MAX_BEATS} beats"
    if len(notes) < MIN_NOTES:
        return None, f"fewer than {MIN_NOTES} notes"
    shifted = notes.copy()
    shifted[:, 0] -= shifted[0, 0]
    return shifted, ""
