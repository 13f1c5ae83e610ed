"""Sparse training step of a :class:`~music_interpret.learners.dictionary.Dictionary` on an accelerator.

The dense step spends five matmuls of ``n x d_in x d_sae`` FLOPs and several passes over
``(n, d_sae)`` tensors on codes of which only tens per token are non-zero. On a GPU this
step keeps the two products that need the whole code matrix dense -- the encoder forward
and the encoder's weight gradient ``x_in^T @ grad_pre`` (``grad_pre`` is zero outside the
active pairs, but a bf16 tensor-core matmul over it is cheaper than gathering) -- and
does the rest on the active (token, latent) pairs with ``embedding_bag``:

* decoder forward ``recon[t] = sum_j v[t, j] W_dec[i[t, j]]`` (per-sample weights ``v``);
  its backward (native on CUDA) gives the code values' gradient ``G[t] . W_dec[i]`` and the
  decoder's gradient ``sum_t v[t, j] G[t]`` by sorting the pairs by latent;
* the L1 term, the firing counts and the L0 come from the pairs' values, so no
  ``(n, d_sae)`` float32 tensor is made (the codes are returned as a sparse COO tensor).

``topk``: the pairs are the ``k`` columns of ``pre.topk(k)``; shapes are fixed, so the step
(AuxK included: dead latents are found by masking, not by a count) never waits for the
device. ``relu_l1``: the pairs come from ``nonzero`` (one host synchronisation per step,
which also tells whether the batch is sparse enough: above :data:`GPU_MAX_DENSITY` the
step falls back to the dense decoder).

Loss values and gradients equal those of the dense step up to summation order (checked on
CPU in ``tests/learners/test_gpu_step.py``; under bf16 autocast the pairs' values and the
decoder weights are cast to bf16 as the dense step's matmuls would). Used on any non-CPU
device by ``sparse_backward: "auto"`` (when ``d_in * d_sae`` is large enough) and
``"always"``; the CPU keeps :mod:`~music_interpret.learners.sparse_step`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .dictionary import Dictionary
from .sparse_step import AUTO_MIN_SIZE

# relu_l1 on a GPU: decode on the pairs when at most this share of the codes is non-zero.
# Estimate for an H100/H200 at d_in 512 (dense decoder forward + two backward matmuls at
# ~600 bf16 TFLOP/s against ~3 TB/s for the gathers); bench/sae_train.py measures both.
GPU_MAX_DENSITY = 0.01


def applies(mode: str, model: Dictionary, x: torch.Tensor) -> bool:
    """Whether ``sparse_backward`` ``mode`` takes this step for a batch ``x`` (not on CPU)."""
    if x.device.type == "cpu":
        return False
    return mode == "always" or (mode == "auto" and model.d_in * model.d_sae >= AUTO_MIN_SIZE)


def bag_decode(W_dec: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[t, j] * W_dec[index[t, j]]`` per token (index (n, k), or flat with
    ``offsets``); differentiable in ``values`` and ``W_dec`` (cast to ``values``' dtype)."""
    weight = W_dec if W_dec.dtype == values.dtype else W_dec.to(values.dtype)
    return F.embedding_bag(index, weight, offsets, mode="sum", per_sample_weights=values)


def _counts(index: torch.Tensor, active: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Per-latent firing counts of the pairs (``index`` flat, ``active`` bool), sync-free."""
    out = torch.zeros(d_sae, dtype=torch.long, device=index.device)
    return out.index_add_(0, index, active.long())


def _coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int, d_sae: int
         ) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values.detach(), (n, d_sae),
                                   check_invariants=False)


def topk_terms(model: Dictionary, x: torch.Tensor, dead: torch.Tensor, k_aux: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Sparse step of a top-k dictionary: (codes as COO, recon, l1, fired, aux_fn)."""
    n, d_sae, k = x.shape[0], model.d_sae, int(model.k)
    pre = model.pre_acts(x)
    top, index = pre.topk(k, dim=-1, sorted=False)
    values = torch.relu(top)
    recon = bag_decode(model.W_dec, index, values) + model.b_dec
    flat = index.reshape(-1)
    live = values.detach().reshape(-1) > 0
    fired = _counts(flat, live, d_sae)
    l1 = values.detach().float().sum() / n
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    codes = _coo(rows, flat, values.reshape(-1), n, d_sae)

    def aux_fn(residual: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor:
        masked = torch.where(dead[None, :], pre, -torch.inf)  # a scalar: no second (n, d_sae)
        top_aux, index_aux = masked.topk(k_aux, dim=-1, sorted=False)
        e_hat = bag_decode(model.W_dec, index_aux, torch.relu(top_aux))
        scale = (dead.sum() / k_aux).clamp(max=1.0)
        return scale * (e_hat.float() - residual).pow(2).sum() / total_var

    return codes, recon, l1, fired, aux_fn


def relu_l1_terms(model: Dictionary, x: torch.Tensor, weighted: bool, max_density: float | None
                  ) -> dict[str, torch.Tensor]:
    """Sparse step of a ReLU dictionary: ``recon``, ``l1`` (mean over tokens), ``fired`` and
    ``codes`` (COO); or, when more than ``max_density`` of the codes are non-zero, the dense
    step's ``recon`` and ``codes`` from the same encoder forward (the caller adds the L1)."""
    n, d_sae = x.shape[0], model.d_sae
    pre = model.pre_acts(x)
    rows, cols = (pre.detach() > 0).nonzero(as_tuple=True)  # token-major; the one host sync
    if max_density is not None and rows.numel() > max_density * n * d_sae:
        f = torch.relu(pre)
        return {"recon": model.decode(f), "codes": f}
    values = pre.reshape(-1).index_select(0, rows * d_sae + cols)  # == relu(pre) there
    offsets = torch.searchsorted(rows, torch.arange(n, device=x.device))
    recon = bag_decode(model.W_dec, cols, values, offsets) + model.b_dec
    if weighted:
        l1 = (values.float() * model.W_dec.norm(dim=1).index_select(0, cols)).sum() / n
    else:
        l1 = values.float().sum() / n
    fired = _counts(cols, torch.ones_like(cols, dtype=torch.bool), d_sae)
    return {"recon": recon, "l1": l1, "fired": fired, "codes": _coo(rows, cols, values, n, d_sae)}
