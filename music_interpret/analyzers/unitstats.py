"""Streaming label statistics of units (latents, raw dimensions, control directions).

For every unit u and label l: firing rate, mean activation, share of the unit's positive
activation mass and of its firings on the label (precision), and the AUROC of the unit's
activation for "token has label l" against every other selected token.

Streaming AUROC (memory independent of the token count, no tokens x units matrix): the
Mann-Whitney form AUROC = (sum of the positives' mid-ranks - n+(n+ + 1)/2) / (n+ n-)
needs one number per (unit, label) once every unit's distribution is known. Pass 1
builds an exact per-unit histogram with ``bins`` fixed bins (from a calibration sample:
ReLU units get one bin for exact zeros, where ties are real ties, and ``bins`` bins
linear in sqrt(a / max) above; signed units ``bins`` linear bins over the sample's range,
out-of-range values in the end bins). Pass 2 maps every value to its bin's mid-rank and
adds one-hot labels (tokens x labels) @ mid-ranks (tokens x units), in float64. The
result equals the AUROC of the binned values exactly (ties inside a bin count 1/2);
against the unbinned AUROC the error is at most 1/2 * (largest count of a bin other
than the zero bin) / max(n+, n-), reported as ``best_score_error``.

Song spread (``track_songs``): a unit that fires in one song only can reach a high AUROC
for any label of that song (its key, its instrument). Per unit, the positive activation
mass of each song is summed as the tokens stream by (songs are contiguous in store order:
a song's tokens form one run) and folded into the largest song's share of the mass and
the effective number of songs, (sum of masses)^2 / sum of squared song masses.

Signed units are scored two-sided, ``max(AUROC, 1 - AUROC)``: a dimension low on a label
separates it as well as one high on it. Null labels (see
:meth:`LabelSpace.chunks`) add one set of rank sums each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

UNIT_BLOCK = 1024  # units handled at once inside a chunk (bounds the temporaries)


class UnitStats:
    """Streaming label statistics of ``n_units`` units, kept as tensors on ``device`` (the
    activations, labels and units are expected there: nothing crosses to the host per chunk)."""

    def __init__(self, n_units: int, n_labels: int, bins: int, *, sparse: bool,
                 two_sided: bool = False, n_null: int = 0, auroc_only: bool = False,
                 track_songs: bool = False, device: Any = "cpu") -> None:
        import torch

        self.n_units, self.n_labels, self.bins, self.sparse = n_units, n_labels, bins, sparse
        self.two_sided, self.auroc_only = two_sided, auroc_only
        self.device = torch.device(device)
        self.n_bins = bins + 1 if sparse else bins  # sparse: bin 0 holds the exact zeros
        f64 = {"dtype": torch.float64, "device": self.device}
        self.lo = torch.zeros(n_units, device=self.device)
        self.hi = torch.ones(n_units, device=self.device)
        self.hist = torch.zeros((n_units, self.n_bins), dtype=torch.int64, device=self.device)
        self.midrank: Any = None  # float64 (units, n_bins) mid-rank / N, after pass 1
        shape = (n_labels, n_units)
        self.fires = torch.zeros(shape, **f64)
        self.sums = torch.zeros(shape, **f64)
        self.pos_sums = torch.zeros(shape, **f64) if not sparse else self.sums
        self.rank_sums = torch.zeros(shape, **f64)
        self.null_rank_sums = torch.zeros((n_null, *shape), **f64)
        self.total_fires = torch.zeros(n_units, **f64)
        self.total_pos = torch.zeros(n_units, **f64)
        self.track_songs = track_songs
        self.song_carry = torch.zeros(n_units, **f64)  # mass of the song still streaming in
        self.song_max = torch.zeros(n_units, **f64)  # largest finished song mass
        self.song_sq = torch.zeros(n_units, **f64)  # sum of squared finished song masses
        self.song_total = torch.zeros(n_units, **f64)  # sum of finished song masses
        self._last_song: int | None = None

    def calibrate(self, blocks: Iterable[Any]) -> None:
        """Fix the bins from sample blocks (n, units) of activations (tensors on the device)."""
        import torch

        lo = torch.full((self.n_units,), float("inf"), device=self.device)
        hi = torch.full((self.n_units,), float("-inf"), device=self.device)
        for b in blocks:
            if len(b):
                lo = torch.minimum(lo, b.amin(0).float())
                hi = torch.maximum(hi, b.amax(0).float())
        if self.sparse:
            fallback = float(hi.max()) if bool((hi > 0).any()) else 1.0
            self.hi = torch.where(hi > 0, hi, torch.full_like(hi, fallback))
        elif bool(torch.isfinite(lo).all()):
            pad = (hi - lo).clamp_min(1e-6) * 0.05
            self.lo, self.hi = lo - pad, hi + pad

    def flat_bins(self, a: Any, s: int, e: int) -> Any:
        """``unit * n_bins + bin`` (int64 tensor) of activations ``a`` (n, e - s) of units s..e."""
        import torch

        B = self.bins
        if self.sparse:  # bin 0: a <= 0; bins 1..B: linear in sqrt(a / hi)
            inv = 1.0 / self.hi[s:e]
            b = (a * inv).clamp_(0.0, 1.0).sqrt_().mul_(B).floor_().clamp_max_(B - 1).add_(1)
            b.masked_fill_(a <= 0, 0.0)
        else:
            scale = B / (self.hi[s:e] - self.lo[s:e])
            b = (a - self.lo[s:e]).mul_(scale).clamp_(0.0, B - 1).floor_()
        # integers stay exact in float32 (< 2**24) since n_bins * UNIT_BLOCK is far below
        b.add_(torch.arange(e - s, dtype=torch.float32, device=b.device).mul_(self.n_bins))
        return b.long()

    def add_pass1(self, a: Any) -> None:
        """Histogram the units' activations ``a`` (n, units) float32 tensor."""
        import torch

        for s in range(0, self.n_units, UNIT_BLOCK):
            e = min(self.n_units, s + UNIT_BLOCK)
            counts = torch.bincount(self.flat_bins(a[:, s:e], s, e).view(-1),
                                    minlength=(e - s) * self.n_bins)
            self.hist[s:e] += counts.view(e - s, self.n_bins)

    def finish_pass1(self) -> None:
        hist = self.hist.double()
        n = hist.sum(dim=1, keepdim=True)
        below = hist.cumsum(dim=1) - hist
        # float64, like the rank sums (see add_pass2)
        self.midrank = (below + (hist + 1) / 2.0) / n.clamp_min(1)

    def add_pass2(self, y: Any, a: Any, null: list[Any] | None = None,
                  songs: np.ndarray | None = None) -> None:
        """Accumulate label sums: ``y`` (n, labels) one-hot float32, ``a`` (n, units);
        ``null``: one-hot null labels, one (n, labels) per null set; ``songs``: each token's
        song index (needed with ``track_songs``)."""
        if self.track_songs:
            if songs is None:
                raise ValueError("track_songs needs the song of every token")
            self._add_song_mass(a, np.asarray(songs))
        yt = y.T.contiguous()
        yt64 = yt.double()
        # null rank sums only decide a count against a threshold: float32 is plenty
        null32 = [z.T.contiguous() for z in (null or [])][: len(self.null_rank_sums)]
        for s in range(0, self.n_units, UNIT_BLOCK):
            e = min(self.n_units, s + UNIT_BLOCK)
            blk = a[:, s:e]
            fired = (blk > 0).float()
            ranks = self.midrank[s:e].reshape(-1).take(self.flat_bins(blk, s, e))
            # in float64: float32 sums of ranks round differently for other chunkings, and the
            # AUROC formula subtracts two large terms (1e-5 relative error otherwise)
            self.rank_sums[:, s:e] += yt64 @ ranks
            if null32:
                ranks32 = ranks.float()
                for k, z in enumerate(null32):
                    self.null_rank_sums[k, :, s:e] += z @ ranks32
            self.total_fires[s:e] += fired.sum(0)
            if self.auroc_only:  # controls: only their scores per label are needed
                continue
            self.fires[:, s:e] += yt @ fired
            self.sums[:, s:e] += yt @ blk
            if self.sparse:
                self.total_pos[s:e] += blk.sum(0)
            else:
                pos = blk.clamp_min(0)
                self.pos_sums[:, s:e] += yt @ pos
                self.total_pos[s:e] += pos.sum(0)

    def _add_song_mass(self, a: Any, songs: np.ndarray) -> None:
        """Fold the chunk's per-song positive mass into the running song statistics."""
        import torch

        if not len(songs):
            return
        seg_np = np.cumsum(np.r_[False, songs[1:] != songs[:-1]])  # segment of each token
        n_seg = int(seg_np[-1]) + 1
        seg = torch.from_numpy(seg_np).to(a.device)
        continues = self._last_song is not None and int(songs[0]) == self._last_song
        if not continues:
            self._finish_song()
        for s in range(0, self.n_units, UNIT_BLOCK):
            e = min(self.n_units, s + UNIT_BLOCK)
            pos = a[:, s:e].clamp_min(0).double()
            mass = torch.zeros(n_seg, e - s, dtype=torch.float64, device=a.device)
            mass.index_add_(0, seg, pos)
            mass[0] += self.song_carry[s:e]
            done = mass[:-1]
            if len(done):
                self.song_max[s:e] = torch.maximum(self.song_max[s:e], done.max(0).values)
                self.song_sq[s:e] += (done * done).sum(0)
                self.song_total[s:e] += done.sum(0)
            self.song_carry[s:e] = mass[-1]
        self._last_song = int(songs[-1])

    def _finish_song(self) -> None:
        import torch

        self.song_max = torch.maximum(self.song_max, self.song_carry)
        self.song_sq += self.song_carry * self.song_carry
        self.song_total += self.song_carry
        self.song_carry.zero_()

    def host(self) -> dict[str, np.ndarray]:
        """The accumulators as float64 numpy arrays (one copy from the device, at the end)."""
        names = ("hist", "fires", "sums", "pos_sums", "rank_sums", "null_rank_sums",
                 "total_fires", "total_pos")
        return {k: getattr(self, k).cpu().numpy() for k in names}

    def _auroc(self, rank_sums: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
        pos = counts.astype(np.float64)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rank_sums * n - pos * (pos + 1) / 2) / (pos * (n - pos))

    def score(self, auroc: np.ndarray) -> np.ndarray:
        """The AUROC, two-sided for signed units."""
        return np.maximum(auroc, 1.0 - auroc) if self.two_sided else auroc

    def null_best(self, counts: np.ndarray, n: int) -> np.ndarray:
        """(null sets, units) best score over labels under each set of null labels."""
        null = self.null_rank_sums.cpu().numpy()
        out = np.full((len(null), self.n_units), np.nan)
        for k, rs in enumerate(null):
            s = self.score(self._auroc(rs, counts, n))
            out[k] = np.nanmax(np.where(np.isfinite(s), s, np.nan), axis=0, initial=-np.inf)
        return out

    def results(self, names: list[str], attribute: list[str], value: list[str],
                counts: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """Per (label, unit): firing_rate, mean_activation, auroc, score (two-sided for signed
        units), precision_mass, precision_fire (NaN for ``auroc_only`` units); per unit: best
        label and score, its error bound, monosemanticity (= precision_mass of the best
        label) and density."""
        h = self.host()
        if self.track_songs:
            self._finish_song()
            self._last_song = None
        pos = counts.astype(np.float64)[:, None]
        neg = n - pos
        auroc = self._auroc(h["rank_sums"], counts, n)
        score = self.score(auroc)
        with np.errstate(invalid="ignore", divide="ignore"):
            approx = h["hist"][:, 1:] if self.sparse else h["hist"]
            bound = 0.5 * approx.max(axis=1)[None, :] / np.maximum(pos, neg)
            mass = h["pos_sums"] / h["total_pos"][None, :]
            fire = h["fires"] / h["total_fires"][None, :]
        if self.auroc_only:
            mass = fire = np.full_like(auroc, np.nan)
        alive = h["total_fires"] > 0
        best = np.argmax(np.where(np.isfinite(score), score, -np.inf), axis=0)
        units = np.arange(self.n_units)
        nm = np.asarray(names, dtype=object)
        return {
            "firing_rate": h["fires"] / pos,
            "mean_activation": h["sums"] / pos,
            "auroc": auroc,
            "score": score,
            "precision_mass": mass,
            "precision_fire": fire,
            "best": best,
            "best_label": np.where(alive, nm[best], "") if len(nm) else np.full(self.n_units, ""),
            "best_attribute": np.where(alive, np.asarray(attribute, object)[best], "")
            if len(nm) else np.full(self.n_units, ""),
            "best_value": np.where(alive, np.asarray(value, object)[best], "")
            if len(nm) else np.full(self.n_units, ""),
            "best_score": np.where(alive, score[best, units], np.nan),
            "best_score_error": np.where(alive, bound[best, units], np.nan),
            "monosemanticity": np.where(alive, mass[best, units], np.nan),
            "density": h["total_fires"] / max(n, 1),
            **self._song_spread(),
        }

    def _song_spread(self) -> dict[str, np.ndarray]:
        """``song_share_max`` (largest song's share of the positive mass) and
        ``songs_effective`` ((sum of song masses)^2 / sum of their squares), with
        ``track_songs``."""
        if not self.track_songs:
            return {}
        total = self.song_total.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            share = self.song_max.cpu().numpy() / total
            eff = total * total / self.song_sq.cpu().numpy()
        alive = total > 0
        return {"song_share_max": np.where(alive, share, np.nan),
                "songs_effective": np.where(alive, eff, np.nan)}
