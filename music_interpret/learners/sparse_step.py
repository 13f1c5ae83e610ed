"""Sparse training step of a :class:`~music_interpret.learners.dictionary.Dictionary` on CPU.

In a trained dictionary the codes ``f`` are very sparse (an L0 of tens out of thousands
of latents), yet the dense step spends five or six matmuls of ``n x d_in x d_sae``
FLOPs: the encoder forward, the decoder forward ``f @ W_dec``, the gradients
``G @ W_dec^T``, ``f^T @ G`` and ``x^T @ grad_pre`` and, with ``apply_b_dec_to_input``,
``grad_pre @ W_enc^T`` for the ``b_dec`` gradient. Only the encoder forward has to be
dense; everything after it involves only the active (token, latent) pairs:

* decoder forward: ``recon[t] = sum_i f[t, i] W_dec[i]`` over the active ``i`` of ``t``
  (``embedding_bag`` with the code values as per-sample weights);
* gradient of the active code values: ``G[t] . W_dec[i]`` for each active pair (a
  sampled dense-dense product, ``torch.sparse.sampled_addmm``);
* ``W_dec`` gradient: ``sum_t f[t, i] G[t]`` over the tokens on which ``i`` fires and
  ``W_enc[:, i]`` gradient: ``sum_t grad_pre[t, i] x_in[t]`` (``embedding_bag`` over the
  pairs sorted by latent); ``b_enc`` gradient: per-latent sums of ``grad_pre``;
* ``b_dec`` gradient through the encoder input ``x - b_dec``: ``-W_enc @ grad_b_enc``.

The loss value, the gradients of all four parameters and the ``codes``/``recon``
outputs equal those of the dense step up to float32 summation order; every kernel used
is deterministic on CPU (no atomics), so runs repeat bitwise.

``sparse_backward`` (an option of every learner): ``"auto"`` (default) takes the sparse
step on CPU when the batch's code density (active pairs / (tokens x d_sae)) is at most
:data:`AUTO_MAX_DENSITY` and the dictionary is large enough for it to pay
(``d_in * d_sae >= AUTO_MIN_SIZE``), the dense step otherwise and always on GPU;
``"always"`` takes the sparse step whatever the device and density; ``"never"`` keeps
the dense step. For ``topk`` the density is ``k / d_sae``, known before the step; its
AuxK term is sparse too (only pairs of dead latents with positive pre-activation).

A sparse step also returns ``fired`` (per-latent firing counts of the batch, read off
the pairs), which spares the trainer its passes over the dense codes for the firing
tracker and L0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .dictionary import Dictionary

# At d_in 512, d_sae 4096, batch 4096 on 2 CPU cores the sparse step is 4-5x faster at L0 16-64,
# 1.7x at density 0.125 and breaks even near 0.25-0.3; 0.1 leaves a margin for machines whose
# many cores speed up the dense matmuls more than the memory-bound sparse kernels.
AUTO_MAX_DENSITY = 0.1
# Below this d_in * d_sae the dense matmuls are too cheap for the sparse bookkeeping to pay
# (measured at L0 8-16: 0.6x at 16 x 128, 0.9x at 32 x 256, 1.7x at 64 x 512, 2.4x at 128 x 1024).
AUTO_MIN_SIZE = 1 << 15


@dataclass(frozen=True)
class ActivePairs:
    """The active (token, latent) pairs of a code matrix, in token-major and latent-major order.

    ``rows``/``cols``: token and latent of each pair, sorted by token (then latent);
    ``row_ptr``: (n + 1,) where each token's pairs start; ``by_latent``: the stable
    permutation sorting the pairs by latent, ``rows_by_latent = rows[by_latent]`` and
    ``col_ptr``: (d_sae + 1,) where each latent's pairs start in that order.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    row_ptr: torch.Tensor
    by_latent: torch.Tensor
    rows_by_latent: torch.Tensor
    col_ptr: torch.Tensor
    n: int
    d_sae: int

    @classmethod
    def from_pairs(cls, rows: torch.Tensor, cols: torch.Tensor, n: int, d_sae: int) -> ActivePairs:
        """Pairs given token-major (``rows`` non-decreasing)."""
        rows, cols = rows.contiguous(), cols.contiguous()
        by_latent = torch.sort(cols, stable=True).indices
        return cls(rows, cols, _ptr(rows, n), by_latent, rows[by_latent], _ptr(cols, d_sae), n,
                   d_sae)

    @classmethod
    def of_codes(cls, f: torch.Tensor) -> ActivePairs:
        """The non-zero entries of ``f`` (n, d_sae)."""
        rows, cols = f.nonzero(as_tuple=True)
        return cls.from_pairs(rows, cols, f.shape[0], f.shape[1])

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of ``dense`` (n, d_sae) at the pairs."""
        return dense.reshape(-1).index_select(0, self.rows * self.d_sae + self.cols)

    def latent_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(d_sae,) sums of per-pair ``values`` (token-major) over each latent's pairs."""
        return _segment_sums(values.index_select(0, self.by_latent), self.col_ptr)


def _ptr(sorted_index: torch.Tensor, size: int) -> torch.Tensor:
    """CSR pointer (size + 1,) of an index sorted (or counted) per slot."""
    ptr = torch.zeros(size + 1, dtype=torch.long, device=sorted_index.device)
    ptr[1:] = torch.bincount(sorted_index, minlength=size).cumsum(0)
    return ptr


def _segment_sums(values: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` delimited by ``ptr`` (deterministic)."""
    if values.numel() == 0:
        return values.new_zeros(ptr.numel() - 1)
    index = torch.arange(values.numel(), device=values.device)
    return F.embedding_bag(index, values[:, None], ptr[:-1], mode="sum")[:, 0]


def _bag_rows(pairs: ActivePairs, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(d_sae, d) with row i = sum over i's pairs (t, i) of values * weight[t]."""
    return F.embedding_bag(pairs.rows_by_latent, weight, pairs.col_ptr[:-1], mode="sum",
                           per_sample_weights=values.index_select(0, pairs.by_latent))


def _sampled_dots(pairs: ActivePairs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[t] . b[i]`` for each pair (t, i), token-major: the sampled product of a @ b^T."""
    if pairs.nnz == 0:
        return a.new_zeros(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(pairs.row_ptr, pairs.cols, a.new_zeros(pairs.nnz),
                                       (pairs.n, pairs.d_sae), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, a, b.t(), beta=0.0).values()


class _Decode(Function):
    """``f @ W_dec`` from the values of the active pairs of ``f``."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, W_dec: torch.Tensor,
                pairs: ActivePairs) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.cols, W_dec.detach(), pairs.row_ptr[:-1], mode="sum",
                               per_sample_weights=values.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        pairs: ActivePairs = ctx.pairs
        grad = grad.contiguous()
        g_values = _sampled_dots(pairs, grad, W_dec) if ctx.needs_input_grad[0] else None
        g_dec = _bag_rows(pairs, grad, values) if ctx.needs_input_grad[1] else None
        return g_values, g_dec, None


class _PreAt(Function):
    """Pre-activations at the active pairs, with the encoder's parameter gradients.

    ``pre`` is the (detached) dense ``x_in @ W_enc + b_enc`` already computed, ``x_in``
    the encoder input (``x - b_dec`` when ``b_dec`` is applied to the input, else ``x``).
    """

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, x_in: torch.Tensor, W_enc: torch.Tensor,
                b_enc: torch.Tensor, b_dec: torch.Tensor, pairs: ActivePairs,
                apply_b_dec: bool) -> torch.Tensor:
        ctx.save_for_backward(x_in, W_enc)
        ctx.pairs, ctx.apply_b_dec = pairs, apply_b_dec
        return pairs.gather(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_in, W_enc = ctx.saved_tensors
        pairs: ActivePairs = ctx.pairs
        g_enc = g_benc = g_bdec = None
        if ctx.needs_input_grad[2]:
            g_enc = _bag_rows(pairs, x_in, grad).t()
        if ctx.needs_input_grad[3] or (ctx.apply_b_dec and ctx.needs_input_grad[4]):
            g_benc = pairs.latent_sums(grad)
            if ctx.apply_b_dec and ctx.needs_input_grad[4]:
                g_bdec = -(W_enc @ g_benc)
            if not ctx.needs_input_grad[3]:
                g_benc = None
        return None, None, g_enc, g_benc, g_bdec, None, None


class _LatentSums(Function):
    """Per-latent sums of pair values (gradient: the latent's entry, gathered back)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, pairs: ActivePairs) -> torch.Tensor:
        ctx.pairs = pairs
        return pairs.latent_sums(values.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad.index_select(0, ctx.pairs.cols), None


def encoder_input(model: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """``x - b_dec`` (detached) when the dictionary applies ``b_dec`` to its input, else ``x``."""
    return x - model.b_dec.detach() if model.apply_b_dec_to_input else x


def pre_at(model: Dictionary, pre: torch.Tensor, x_in: torch.Tensor,
           pairs: ActivePairs) -> torch.Tensor:
    """Pre-activations at ``pairs``, differentiable w.r.t. ``W_enc``, ``b_enc`` (and ``b_dec``)."""
    return _PreAt.apply(pre.detach(), x_in.detach(), model.W_enc, model.b_enc, model.b_dec, pairs,
                        model.apply_b_dec_to_input)


def decode_at(values: torch.Tensor, W_dec: torch.Tensor, pairs: ActivePairs) -> torch.Tensor:
    """``f @ W_dec`` (n, d_in) for codes given by their ``values`` at ``pairs``."""
    return _Decode.apply(values, W_dec, pairs)


def latent_sums(values: torch.Tensor, pairs: ActivePairs) -> torch.Tensor:
    """(d_sae,) sums of the pair ``values`` per latent, differentiable."""
    return _LatentSums.apply(values, pairs)


def sparse_possible(mode: str, model: Dictionary, x: torch.Tensor) -> bool:
    """Whether ``mode`` (one of :data:`~music_interpret.learners.dictionary.SPARSE_MODES`) may take the sparse step for this batch.

    ``"auto"`` then also needs a low enough density (:func:`sparse_enough`).
    """
    if mode == "always":
        return True
    return (mode == "auto" and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and model.d_in * model.d_sae >= AUTO_MIN_SIZE)


def sparse_enough(f: torch.Tensor) -> bool:
    """Whether the density of the codes ``f`` is at most :data:`AUTO_MAX_DENSITY`."""
    return int(torch.count_nonzero(f)) <= AUTO_MAX_DENSITY * f.numel()


def relu_l1_terms(model: Dictionary, x: torch.Tensor, f: torch.Tensor, weighted: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse step of a ReLU dictionary: (reconstruction, L1 averaged over tokens, fired).

    ``f = relu(pre)`` comes from the dense encoder forward (its autograd graph is not
    used); the L1 is ``sum_i f_i ||W_dec[i]||`` (``weighted``) or ``sum_i f_i`` per token;
    ``fired[i]``: on how many tokens latent i is active.
    """
    f = f.detach()
    pairs = ActivePairs.of_codes(f)
    values = pre_at(model, f, encoder_input(model, x), pairs)  # pre == f > 0 at the pairs
    recon = decode_at(values, model.W_dec, pairs) + model.b_dec
    n = f.shape[0]
    if weighted:
        l1 = (latent_sums(values, pairs) * model.W_dec.norm(dim=1)).sum() / n
    else:
        l1 = values.sum() / n
    return recon, l1, pairs.col_ptr.diff()


def topk_terms(model: Dictionary, x: torch.Tensor, dead: torch.Tensor, k_aux: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Sparse step of a top-k dictionary: (codes, recon, l1, fired, aux_fn).

    ``aux_fn(residual, total_var)`` gives the AuxK loss (see
    :func:`~music_interpret.learners.topk.auxk_loss`) from the pairs of dead latents
    among the top ``k_aux`` masked pre-activations.
    """
    n, d_sae = x.shape[0], model.d_sae
    x_in = encoder_input(model, x)
    with torch.no_grad():
        pre = model.pre_acts(x)
        top, index = pre.topk(model.k, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter_(-1, index, torch.relu(top))
        cols = index.sort(dim=-1).values.reshape(-1)
        rows = torch.arange(n, device=x.device).repeat_interleave(model.k)
    pairs = ActivePairs.from_pairs(rows, cols, n, d_sae)
    values = torch.relu(pre_at(model, pre, x_in, pairs))
    recon = decode_at(values, model.W_dec, pairs) + model.b_dec
    l1 = values.detach().sum() / n
    fired = torch.bincount(cols[values.detach() > 0], minlength=d_sae)

    def aux_fn(residual: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor:
        scale = (dead.sum() / k_aux).clamp(max=1.0)
        if not bool(dead.any()):
            return scale * residual.new_zeros(())
        with torch.no_grad():
            masked = torch.where(dead[None, :], pre, -torch.inf)
            top_aux, index_aux = masked.topk(k_aux, dim=-1, sorted=False)
            index_aux, order = index_aux.sort(dim=-1)
            keep = top_aux.gather(-1, order) > 0  # ReLU: the others add nothing
            rows_aux, slot = keep.nonzero(as_tuple=True)
            cols_aux = index_aux[rows_aux, slot]
        aux_pairs = ActivePairs.from_pairs(rows_aux, cols_aux, n, d_sae)
        e_hat = decode_at(pre_at(model, pre, x_in, aux_pairs), model.W_dec, aux_pairs)
        return scale * (e_hat.float() - residual).pow(2).sum() / total_var

    return codes, recon, l1, fired, aux_fn
