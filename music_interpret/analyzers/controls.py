"""Control units for the feature-token analysis: what a latent must beat to count as a finding.

A latent whose AUROC for a label is high says little on its own: the residual stream
carries each token's own input, and many directions of it separate common labels. So
every label is also scored by units that know nothing the dictionary learned:

* ``neuron``: the raw dimensions of the hook point, two-sided (``max(AUROC, 1 - AUROC)``:
  a dimension that is low on a label separates it as well as one that is high);
* ``embedding``: projections on the model's own input-embedding rows (``pitch=C4``,
  ``position=6``, ...), two-sided: "the stream still carries the token's input";
* ``random``: one random direction per live latent, ReLU'd at a threshold that gives it
  the latent's firing density on a calibration sample (density-matched);
* ``random_sae``: a dictionary of the same size and architecture at initialisation
  (random unit encoder columns, decoder = encoder transposed, encoder bias 0, decoder
  bias at the activations' mean).

Each group is a :class:`UnitGroup`: a function from host activations (n, d_model) to
unit values (n, units), evaluated chunk by chunk like the latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONTROL_GROUPS = ("neuron", "embedding", "random", "random_sae")


@dataclass
class UnitGroup:
    """Units evaluated on every chunk: ``encode`` maps float32 (n, d_model) CPU activations
    to (n, n_units) CPU float32 (None: the activations themselves)."""

    name: str
    n_units: int
    encode: Callable[[Any], Any] | None
    sparse: bool  # non-negative with exact zeros (ReLU units): one bin for the zeros
    two_sided: bool  # signed units: a label is scored by max(AUROC, 1 - AUROC)
    unit_names: list[str] = field(default_factory=list)


def neuron_group(d_model: int) -> UnitGroup:
    return UnitGroup("neuron", d_model, None, sparse=False, two_sided=True,
                     unit_names=[f"dim {i}" for i in range(d_model)])


def embedding_group(names: Sequence[str], rows: Any, device: Any = "cpu") -> UnitGroup:
    """Projections on unit-normalised input-embedding rows (rows: (k, d_model) tensor)."""
    w = rows.detach().float().to(device)
    w = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).T.contiguous()

    def encode(x: Any) -> Any:
        return x @ w

    return UnitGroup("embedding", w.shape[1], encode, sparse=False, two_sided=True,
                     unit_names=list(names))


def random_group(sample: Any, densities: np.ndarray, seed: int) -> UnitGroup:
    """One density-matched random ReLU direction per unit with density > 0.

    ``sample``: calibration activations (n, d_model); the threshold of direction i is
    the (1 - density_i) quantile of the sample's projections, so that it fires on the
    same share of the sample as latent i.
    """
    import torch

    alive = np.flatnonzero(densities > 0)
    gen = torch.Generator().manual_seed(int(seed))
    d = sample.shape[1]
    w = torch.randn(d, len(alive), generator=gen).to(sample.device)
    w /= w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    share = np.clip(densities[alive], 1.0 / max(len(sample), 1), 1.0)
    thresholds = torch.zeros(len(alive), device=sample.device)
    if len(sample):
        for s in range(0, len(alive), 1024):  # (sample, 1024) projections at a time
            proj = sample.float() @ w[:, s: s + 1024]
            ranks = np.minimum(len(sample) - 1, np.floor((1.0 - share[s: s + 1024]) * len(sample)))
            ordered = proj.sort(dim=0).values
            thresholds[s: s + 1024] = ordered[torch.from_numpy(ranks.astype(np.int64)).to(sample.device),
                                              torch.arange(proj.shape[1], device=sample.device)]

    def encode(x: Any) -> Any:
        return torch.relu(x @ w - thresholds)

    return UnitGroup("random", len(alive), encode, sparse=True, two_sided=False,
                     unit_names=[f"random for latent {i}" for i in alive])


def random_sae_group(d_sae: int, sample: Any, seed: int, k: int | None = None) -> UnitGroup:
    """A dictionary of ``d_sae`` latents at initialisation (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed) + 1)
    d = sample.shape[1]
    w = torch.randn(d, d_sae, generator=gen).to(sample.device)
    w /= w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    b_dec = sample.float().mean(dim=0)

    def encode(x: Any) -> Any:
        pre = (x - b_dec) @ w
        if k is None:
            return torch.relu(pre)
        values, index = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))

    return UnitGroup("random_sae", d_sae, encode, sparse=True, two_sided=False,
                     unit_names=[f"random-init latent {i}" for i in range(d_sae)])
