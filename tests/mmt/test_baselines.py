"""Count baselines (unigram, bigram, tuned bigram) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from music_interpret.adapters.mmt.baselines import (
    ALPHA_GRID,
    bigram_baseline,
    tune_bigram_alpha,
    unigram_baseline,
)

N_TOKENS = (3, 2, 2, 2, 2, 2)


def _song(type_codes: list[int]) -> np.ndarray:
    codes = np.zeros((len(type_codes), 6), np.int64)
    codes[:, 0] = type_codes
    return codes


TRAIN = [_song([0, 1, 1, 2])]  # type targets 1, 1, 2; pairs 0->1, 1->1, 1->2
VALID = [_song([0, 2, 1])]  # type targets 2, 1; pairs 0->2, 2->1
CONST = -math.log(4 / 5)  # other fields: three 0 -> 0 targets, V = 2, add-one


def test_unigram_add_one_by_hand() -> None:
    out = unigram_baseline(TRAIN, VALID, N_TOKENS)
    # counts of type targets 0, 1, 2 = 0, 2, 1; P = (c + 1) / (3 + 3)
    assert out["type"] == pytest.approx(-(math.log(2 / 6) + math.log(3 / 6)) / 2)
    for name in ("beat", "position", "pitch", "duration", "instrument"):
        assert out[name] == pytest.approx(CONST)
    assert out["total"] == pytest.approx(out["type"] + 5 * CONST)


def test_bigram_add_one_by_hand() -> None:
    out = bigram_baseline(TRAIN, VALID, N_TOKENS)
    # P(2 | 0) = (0 + 1) / (1 + 3); P(1 | 2) = (0 + 1) / (0 + 3): code 2 never precedes
    assert out["type"] == pytest.approx(-(math.log(1 / 4) + math.log(1 / 3)) / 2)
    assert out["beat"] == pytest.approx(CONST)
    assert out["total"] == pytest.approx(out["type"] + 5 * CONST)


def test_bigram_additive_alpha_by_hand() -> None:
    a = 0.5
    out = bigram_baseline(TRAIN, [_song([0, 1, 2])], N_TOKENS, alpha=a)
    # P(1 | 0) = (1 + a) / (1 + 3a); P(2 | 1) = (1 + a) / (2 + 3a)
    want = -(math.log((1 + a) / (1 + 3 * a)) + math.log((1 + a) / (2 + 3 * a))) / 2
    assert out["type"] == pytest.approx(want)
    assert out["pitch"] == pytest.approx(-math.log((3 + a) / (3 + 2 * a)))


def test_tuned_alpha_follows_the_data() -> None:
    rng = np.random.default_rng(0)
    songs = []
    for _ in range(10):
        codes = np.zeros((200, 6), np.int64)
        codes[:, 0] = np.arange(200) % 2 + 1  # type alternates 1, 2: no smoothing wanted
        codes[:, 3] = rng.integers(0, 2, 200)  # pitch is a fair coin: uniform is best
        songs.append(codes)
    alphas = tune_bigram_alpha(songs, N_TOKENS)
    assert alphas["type"] == ALPHA_GRID[0]
    assert alphas["pitch"] >= 1.0
