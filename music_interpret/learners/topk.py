"""``topk``: the top-k sparse autoencoder (Gao et al. 2024) with the AuxK loss for dead latents.

Codes keep the ``k`` largest pre-activations (then ReLU); decoder rows stay unit
norm (the gradient component along each row is removed before the step, rows are
renormalised after it). A latent is dead when it has not fired for ``dead_tokens``
training tokens (default: the train stage's ``dead_window_tokens``); AuxK reconstructs the residual ``x - x^`` from the top ``k_aux``
pre-activations of the dead latents, normalised by the batch's total variance,
scaled down by min(1, n_dead / k_aux), and weighted by ``aux_coeff``.

``sparse_backward`` (``"auto"``, ``"always"``, ``"never"``): ``"auto"`` takes the sparse
step of :mod:`~music_interpret.learners.sparse_step` on CPU when ``k / d_sae`` is at
most 10% (and d_in * d_sae >= 32768): decoder, AuxK and all gradients on the k (and
AuxK) active pairs of each token only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gpu_step as GS
from . import sparse_step as SP
from .dictionary import Dictionary, Learner, RecipeConfig, tied_init

DEFAULTS = {"lr": 2e-4, "b_dec_init": "geometric_median", "input_scaling": "sample",
            "lr_warmup_steps": 0, "lr_decay": "constant", "grad_clip": 1.0}


@dataclass
class TopKConfig(RecipeConfig):
    """Options of ``topk`` (``None``: the default).

    ``dead_tokens``: a latent that has not fired for this many training tokens is dead
    and gets the AuxK loss; ``None`` takes the train stage's ``dead_window_tokens`` (the
    window its dead-latent statistics use), so that both agree.
    """

    k: int = 32
    k_aux: int | None = None
    aux_coeff: float = 1.0 / 32
    dead_tokens: int | None = None
    dec_init_norm: float = 1.0

    def __post_init__(self) -> None:
        self._check_common()
        self.fill(DEFAULTS)
        if self.k < 1:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        if self.k_aux is not None and self.k_aux < 1:
            raise ValueError(f"k_aux must be positive, got {self.k_aux}")
        if self.aux_coeff < 0 or (self.dead_tokens is not None and self.dead_tokens < 1):
            raise ValueError("aux_coeff must be >= 0 and dead_tokens positive")


class TopKLearner(Learner):
    """Top-k sparse autoencoder with unit-norm decoder rows and the AuxK dead-latent loss."""

    name = "topk"
    description = "Top-k sparse autoencoder (exactly k active latents) with the AuxK loss for dead latents."
    Config = TopKConfig
    architecture = "topk"

    def build(self, d_in: int, generator: torch.Generator) -> Dictionary:
        c: TopKConfig = self.config
        d_sae = c.size(d_in)
        if c.k > d_sae:
            raise ValueError(f"k ({c.k}) exceeds d_sae ({d_sae})")
        model = Dictionary(d_in, d_sae, k=c.k, apply_b_dec_to_input=True)
        tied_init(model, generator, 1.0)
        return model

    def k_aux(self, d_in: int, d_sae: int) -> int:
        return min(self.config.k_aux or d_in // 2 or 1, d_sae)

    def loss(self, model: Dictionary, x: torch.Tensor, step: int, total: int,
             dead: torch.Tensor) -> dict[str, torch.Tensor]:
        c: TopKConfig = self.config
        k_aux = self.k_aux(model.d_in, model.d_sae)
        sparse_ok = c.sparse_backward == "always" or model.k <= SP.AUTO_MAX_DENSITY * model.d_sae
        if GS.applies(c.sparse_backward, model, x) and sparse_ok:
            f, recon, l1, fired, aux_fn = GS.topk_terms(model, x, dead, k_aux)
        elif SP.sparse_possible(c.sparse_backward, model, x) and sparse_ok:
            f, recon, l1, fired, aux_fn = SP.topk_terms(model, x, dead, k_aux)
        else:
            pre, f, recon = model.run(x)
            l1, fired = f.detach().sum(-1, dtype=torch.float32).mean(), None

            def aux_fn(residual: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor:
                return auxk_loss(model, pre, residual, dead, k_aux, total_var)

        xf = x.float()
        err = xf - recon.float()
        mse = err.pow(2).mean()
        total_var = (xf - xf.mean(0)).pow(2).sum().clamp_min(1e-12)
        aux = aux_fn(err.detach(), total_var)
        loss = err.pow(2).sum() / total_var + c.aux_coeff * aux
        out = {"loss": loss, "mse": mse, "l1": l1, "aux": aux, "codes": f, "recon": recon}
        return out if fired is None else {**out, "fired": fired}

    def before_step(self, model: Dictionary) -> None:
        model.remove_parallel_grad()

    def after_step(self, model: Dictionary) -> None:
        model.normalize_decoder()


def auxk_loss(model: Dictionary, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
              k_aux: int, total_var: torch.Tensor) -> torch.Tensor:
    """AuxK: how well the top ``k_aux`` dead latents reconstruct ``residual`` (0 without dead ones).

    Written without host syncs: living latents are masked to -inf (ReLU makes them 0)
    and the scale min(1, n_dead / k_aux) stays a tensor.
    """
    masked = torch.where(dead[None, :], pre, -torch.inf)
    values, index = masked.topk(k_aux, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))
    e_hat = acts @ model.W_dec
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    return scale * (e_hat.float() - residual).pow(2).sum() / total_var
