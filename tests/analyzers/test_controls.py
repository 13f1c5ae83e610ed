"""Controls and findings: a latent counts only when it beats every control for its label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from music_interpret.analyzers.controls import random_group, random_sae_group
from music_interpret.analyzers.feature_token import (
    FeatureTokenConfig,
    LatentSource,
    analyse_findings,
    feature_token_stats,
)
from music_interpret.analyzers.findings import FindingRule, find, null_summary
from music_interpret.learners.io import load_dictionary
from music_interpret.stores.netcdf import check_store

from . import D_MODEL, HOOK, planted_dictionary, planted_store

ATTRS = ["pitch_class", "octave", "next.pitch_class"]
OCTAVE = 0.2  # per dimension; noise 0.1


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("controls")
    return (planted_store(tmp / "store", octave_signal=OCTAVE),
            planted_dictionary(tmp / "dict", octave_signal=OCTAVE))


def analyse(planted: tuple[Path, Path], embeddings=None, **cfg: object):  # noqa: ANN001, ANN201
    store, folder = planted
    d = load_dictionary(folder)
    config = FeatureTokenConfig(**{"attributes": ATTRS, **cfg})
    labels, results = feature_token_stats(check_store(store), HOOK, LatentSource(d.encode_host, d.d_sae),
                                          None, config, embeddings=embeddings, seed=0)
    return labels, results, analyse_findings(labels, results, config)


def test_single_dimension_latents_are_explained_by_the_raw_dimensions(planted) -> None:  # noqa: ANN001
    labels, results, analysis = analyse(planted)
    lat = results["latent"]
    for i in range(12):  # the planted pitch-class latents separate their class perfectly...
        assert lat["best_score"][i] > 0.999
    # ... and so does raw dimension i: none of them is a finding
    found = analysis["found"]
    assert not found["finding"][:12].any()
    assert analysis["controls"]["neuron"]["score"][labels.names.index("pitch_class=C")] > 0.999


def test_a_distributed_code_beats_every_control(planted) -> None:  # noqa: ANN001
    labels, results, analysis = analyse(planted)
    rows = {r["latent"]: r for r in analysis["rows"]}
    assert set(rows) == {12}  # the octave latent reads four dimensions at once
    row = rows[12]
    assert row["label"] == "octave=4" and row["when"] == "t"
    assert row["auroc"] >= 0.99 and row["margin"] >= 0.02 and row["precision_mass"] > 0.9
    assert set(row["controls"]) == {"neuron", "random", "random_sae"}
    assert row["controls"]["neuron"]["score"] < row["auroc"] - 0.02
    assert row["controls"]["neuron"]["unit"] in {f"dim {i}" for i in range(12, 16)}


def test_the_embedding_control_explains_the_input(planted) -> None:  # noqa: ANN001
    rows = torch.zeros(13, D_MODEL)
    rows[:12, :12] = torch.eye(12)  # "pitch class" input rows
    rows[12, 12:16] = 1.0  # an input row along the octave code
    names = [f"pitch={p}" for p in range(12)] + ["octave row"]
    labels, results, analysis = analyse(planted, (names, rows), controls=["embedding"])
    assert analysis["rows"] == []  # the octave latent is the input row itself
    c = analysis["controls"]["embedding"]
    assert c["unit"][labels.names.index("octave=4")] == "octave row"
    assert c["unit"][labels.names.index("pitch_class=D")] == "pitch=2"


def test_next_token_labels_are_scored_separately(planted) -> None:  # noqa: ANN001
    labels, results, _ = analyse(planted)
    when = dict(zip(labels.names, labels.when, strict=True))
    assert when["next.pitch_class=C"] == "t+1" and when["pitch_class=C"] == "t"
    auroc = results["latent"]["auroc"]
    # the planted latents know the current pitch class, not the next one (random pitches)
    assert auroc[labels.names.index("next.pitch_class=C"), 0] < 0.6
    assert auroc[labels.names.index("pitch_class=C"), 0] > 0.999


def test_permutation_null_for_the_count(planted) -> None:  # noqa: ANN001
    labels, results, analysis = analyse(planted, null_shifts=5)
    null = analysis["null"]
    assert null["observed"] == 13 and len(null["null_counts"]) == 5
    assert max(null["null_counts"]) <= 1 and null["p"] == pytest.approx(1 / 6)
    assert results["latent"]["null_best"].shape == (5, 14)


def test_notes_only_is_the_default(planted) -> None:  # noqa: ANN001
    labels, _, _ = analyse(planted)
    all_labels, _, _ = analyse(planted, tokens="all")
    store = check_store(planted[0])
    assert labels.n_tokens < all_labels.n_tokens == store.n_tokens


def test_random_directions_match_the_latents_density() -> None:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(4000, 8, generator=gen)
    densities = np.array([0.5, 0.1, 0.01, 0.0])
    group = random_group(sample, densities, seed=3)
    assert group.n_units == 3 and group.sparse and not group.two_sided
    fired = (group.encode(sample) > 0).double().mean(0).numpy()
    np.testing.assert_allclose(fired, densities[:3], atol=2e-3)
    other = random_group(sample, densities, seed=4)
    assert not torch.equal(other.encode(sample), group.encode(sample))
    sae = random_sae_group(16, sample, seed=0, k=2)
    assert ((sae.encode(sample) > 0).sum(1) <= 2).all()


def test_finding_rule_needs_every_part() -> None:
    latent = {"auroc": np.array([[0.95, 0.95, 0.95, 0.85]]),
              "precision_mass": np.array([[0.9, 0.3, 0.9, 0.9]])}
    controls = {"neuron": {"score": np.array([0.90]), "unit": np.array(["dim 0"], object)},
                "embedding": {"score": np.array([0.94]), "unit": np.array(["pitch=C4"], object)}}
    found = find(latent, controls, FindingRule(min_auroc=0.9, margin=0.005, min_precision=0.5))
    assert found["finding"].tolist() == [True, False, True, False]
    assert found["control"][0] == "embedding"
    assert found["margin"][0] == pytest.approx(0.01)
    strict = find(latent, controls, FindingRule(min_auroc=0.9, margin=0.02, min_precision=0.5))
    assert not strict["finding"].any()
    null = null_summary(np.array([0.95, 0.2, 0.91]), np.array([[0.5, 0.6, 0.95], [0.2, 0.2, 0.2]]),
                        FindingRule())
    assert null == {"observed": 2, "null_counts": [1, 0], "null_mean": 0.5, "null_max": 1, "p": 1 / 3}


def test_latents_of_few_songs_are_left_out(planted) -> None:  # noqa: ANN001
    _, results, analysis = analyse(planted)
    eff = results["latent"]["songs_effective"][12]
    assert 8 < eff <= 12  # the octave latent fires across the store's 12 songs
    labels, results, strict = analyse(planted, min_songs=13)  # more songs than the store has
    assert not strict["found"]["finding"].any() and strict["found"]["few_songs"][12]
    assert strict["rows"] == [] and analysis["rows"][0]["songs_effective"] == eff


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_song_spread_streams_exactly(chunk: int) -> None:
    from music_interpret.analyzers.unitstats import UnitStats

    rng = np.random.default_rng(chunk)
    songs = np.repeat(np.arange(9), rng.integers(20, 60, 9))  # contiguous songs, uneven lengths
    a = np.maximum(rng.normal(size=(len(songs), 5)), 0).astype(np.float32)
    a[songs == 4, 0] *= 50  # unit 0: mostly one song
    a[songs != 2, 1] = 0  # unit 1: only song 2
    a[:, 4] = 0  # unit 4: dead
    stats = UnitStats(5, 1, 16, sparse=True, track_songs=True)
    stats.calibrate([torch.from_numpy(a)])
    for s in range(0, len(a), chunk):
        stats.add_pass1(torch.from_numpy(a[s:s + chunk]))
    stats.finish_pass1()
    for s in range(0, len(a), chunk):
        stats.add_pass2(torch.ones(len(a[s:s + chunk]), 1), torch.from_numpy(a[s:s + chunk]),
                        songs=songs[s:s + chunk])
    r = stats.results(["x"], ["a"], ["v"], np.array([len(a)]), len(a))
    mass = np.stack([a[songs == k].sum(0) for k in range(9)]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        want_share = mass.max(0) / mass.sum(0)
        want_eff = mass.sum(0) ** 2 / (mass ** 2).sum(0)
    np.testing.assert_allclose(r["song_share_max"][:4], want_share[:4], rtol=1e-6)
    np.testing.assert_allclose(r["songs_effective"][:4], want_eff[:4], rtol=1e-6)
    assert r["song_share_max"][1] == 1.0 and r["songs_effective"][1] == 1.0
    assert r["song_share_max"][0] > 0.5 and np.isnan(r["songs_effective"][4])
    with pytest.raises(ValueError, match="track_songs"):
        stats.add_pass2(torch.ones(1, 1), torch.from_numpy(a[:1]))
