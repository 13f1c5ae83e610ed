"""Reconstruction and sparsity metrics of a dictionary (all on torch tensors, no host syncs).

* FVU: fraction of variance unexplained, sum ||x - x^||^2 / sum ||x - mean(x)||^2
  (the mean over the batch, or over the whole held-out set in :class:`EvalAccumulator`);
  explained variance = 1 - FVU.
* MSE: mean over tokens and dimensions of (x - x^)^2.
* L0: mean number of non-zero codes per token; L1: mean sum of |codes| per token.
* Feature density: the fraction of tokens a latent fires on. A latent is dead when it
  did not fire for a window of tokens (:class:`FiringTracker`), dense when its density
  exceeds a threshold (e.g. 0.1).
"""

from __future__ import annotations

import math

import torch

DENSITY_EPS = 1e-10  # added before log10 so that never-firing latents stay finite


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained against the mean of ``x`` over its rows."""
    x = x.float()
    total = (x - x.mean(0)).pow(2).sum()
    return (x - recon.float()).pow(2).sum() / total.clamp_min(1e-12)


def explained_variance(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return 1.0 - fvu(x, recon)


def mse(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (x.float() - recon.float()).pow(2).mean()


def l0(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).float().sum(-1).mean()


def l1(codes: torch.Tensor) -> torch.Tensor:
    return codes.float().abs().sum(-1).mean()


def density(fire_counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Firing frequency per latent from the counts of tokens it fired on."""
    return fire_counts.float() / max(int(n_tokens), 1)


def log10_density(dens: torch.Tensor) -> torch.Tensor:
    """log10(density + 1e-10): the usual feature-density histogram's x axis."""
    return torch.log10(dens + DENSITY_EPS)


def density_histogram(dens: torch.Tensor, bins: int = 20, low: float = -10.0) -> dict[str, list[float]]:
    """Histogram of log10 densities on [low, 0] as JSON lists (edges and counts)."""
    values = log10_density(dens).clamp(low, 0.0).cpu()
    counts = torch.histc(values, bins=bins, min=low, max=0.0)
    edges = torch.linspace(low, 0.0, bins + 1)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def dead_fraction(dens: torch.Tensor) -> torch.Tensor:
    return (dens == 0).float().mean()


def dense_fraction(dens: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    return (dens > threshold).float().mean()


class FiringTracker:
    """Tokens since each latent last fired (dead after ``window`` tokens) and window counts."""

    def __init__(self, d_sae: int, device: torch.device | str) -> None:
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.counts = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, codes: torch.Tensor) -> None:
        self.add_counts((codes != 0).sum(0), codes.shape[0])

    def add_counts(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Count a batch of ``n_tokens`` tokens on which latent i fired ``fired[i]`` times."""
        self.counts += fired
        self.tokens += n_tokens
        self.since_fired += n_tokens
        self.since_fired.masked_fill_(fired > 0, 0)

    def dead(self, window: int) -> torch.Tensor:
        """Mask of latents silent for at least ``window`` tokens."""
        return self.since_fired >= window

    def reset_counts(self) -> torch.Tensor:
        """Densities since the last reset; starts a new window."""
        dens = density(self.counts, self.tokens)
        self.counts = torch.zeros_like(self.counts)
        self.tokens = 0
        return dens


class EvalAccumulator:
    """Held-out metrics over many batches: FVU against the held-out mean, L0, densities."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.sum_x, self.sum_x2, self.sse, self.sse_raw = z(d_in), z(d_in), z(()), z(())
        self.sum_x_raw, self.sum_x2_raw = z(d_in), z(d_in)
        self.nnz, self.l1 = z(()), z(())
        self.counts = z(d_sae)

    def update(self, x: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor,
               raw_scale: torch.Tensor | None = None) -> None:
        """``raw_scale``: per-dimension factor from raw to training space (for raw-space FVU)."""
        x, err = x.double(), (x.double() - recon.double())
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum(0)
        self.sse += err.pow(2).sum()
        if raw_scale is not None:
            xr, er = x / raw_scale, err / raw_scale
            self.sum_x_raw += xr.sum(0)
            self.sum_x2_raw += xr.pow(2).sum(0)
            self.sse_raw += er.pow(2).sum()
        fired = codes != 0
        self.nnz += fired.sum()
        self.l1 += codes.double().abs().sum()
        self.counts += fired.sum(0)

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        n = max(self.n, 1)
        var = (self.sum_x2 - self.sum_x.pow(2) / n).sum()
        out = {"tokens": self.n, "fvu": float(self.sse / var.clamp_min(1e-12)),
               "mse": float(self.sse / (n * len(self.sum_x))),
               "l0": float(self.nnz / n), "l1": float(self.l1 / n)}
        out["explained_variance"] = 1.0 - out["fvu"]
        if self.sum_x2_raw.any():
            var_raw = (self.sum_x2_raw - self.sum_x_raw.pow(2) / n).sum()
            out["fvu_raw"] = float(self.sse_raw / var_raw.clamp_min(1e-12))
        dens = density(self.counts, n)
        out["dead_fraction"] = float(dead_fraction(dens))
        out["dense_fraction"] = float(dense_fraction(dens, dense_threshold))
        out["log10_density_histogram"] = density_histogram(dens)  # type: ignore[assignment]
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in out.items()}
