"""SAELens 6.54.12's training step, rebuilt in plain PyTorch for the GPU benchmark.

SAELens's dependency closure (transformer-lens, transformers, datasets, wandb, pandas,
pyarrow, ...) is far larger than what can be carried to the offline GPU machine, so
``bench/sae_train.py`` times this reconstruction instead of the library; where SAELens
itself is installed (``bench/.venv-saelens``, CPU), ``tests/learners/test_saelens_step.py``
checks that both give the same losses and the same weights over several steps.

What is rebuilt (file names under ``sae_lens/`` of sae-lens 6.54.12):

* ``saes/sae.py``: ``TrainingSAE.initialize_weights`` (Kaiming-uniform decoder rows scaled
  to norm ``decoder_init_norm`` 0.1, encoder = decoder transposed, zero biases),
  ``process_sae_in`` (``x - b_dec``), ``training_forward_pass`` (per-item squared error
  summed over dimensions, mean over tokens, plus the architecture's auxiliary losses);
* ``saes/standard_sae.py``: ``StandardTrainingSAE`` (ReLU; L1 loss = coefficient x mean
  over tokens of the 1-norm of the codes weighted by the decoder rows' norms);
* ``saes/topk_sae.py``: ``TopKTrainingSAE`` (pre-activations times the decoder norms,
  ``TopK`` as a dense scatter, decoding divided by the norms; AuxK on the top
  ``d_in // 2`` dead latents, which reads the dead count on the host);
* ``training/sae_trainer.py``: ``SAETrainer._train_step`` (bf16 autocast around the forward,
  firing bookkeeping on the dense codes, backward, gradient norm clipped at 1, Adam, zero
  grad); dead latents: not fired for more than ``dead_feature_window`` (1000) steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SAELENS_VERSION = "6.54.12"
DEAD_FEATURE_WINDOW = 1000


class PeerSAE(nn.Module):
    """``StandardTrainingSAE`` (``arch="standard"``) or ``TopKTrainingSAE`` (``"topk"``)."""

    def __init__(self, d_in: int, d_sae: int, arch: str = "standard", k: int = 100,
                 l1_coefficient: float = 1.0, decoder_init_norm: float = 0.1,
                 aux_loss_coefficient: float = 1.0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if arch not in ("standard", "topk"):
            raise ValueError(f"arch must be standard or topk, got {arch!r}")
        self.arch, self.k, self.l1_coefficient = arch, k, l1_coefficient
        self.aux_loss_coefficient = aux_loss_coefficient
        w = torch.empty(d_sae, d_in, device=device)
        nn.init.kaiming_uniform_(w)
        w *= decoder_init_norm / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.arch == "standard":
            return torch.relu(hidden_pre), hidden_pre
        hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        values, index = hidden_pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter_(-1, index, values.relu()), hidden_pre

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        if self.arch == "topk":
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        return acts @ self.W_dec + self.b_dec

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, codes, the loss terms) of ``training_forward_pass``."""
        acts, hidden_pre = self.encode_with_hidden_pre(x)
        out = self.decode(acts)
        mse = F.mse_loss(out, x, reduction="none").sum(dim=-1).mean()
        if self.arch == "standard":
            sparsity = (acts * self.W_dec.norm(dim=1)).norm(p=1, dim=-1)
            aux = {"l1_loss": (self.l1_coefficient * sparsity).mean()}
        else:
            aux = {"auxiliary_reconstruction_loss": self._aux(x, out, hidden_pre, dead)}
        return mse + sum(aux.values()), acts, {"mse_loss": mse, **aux}

    def _aux(self, x: torch.Tensor, out: torch.Tensor, hidden_pre: torch.Tensor,
             dead: torch.Tensor | None) -> torch.Tensor:
        if dead is None or (n_dead := int(dead.sum())) == 0:  # the host sync of the original
            return out.new_tensor(0.0)
        residual = (x - out).detach()
        k_aux = x.shape[-1] // 2
        scale = min(n_dead / k_aux, 1.0)
        k_aux = min(k_aux, n_dead)
        top = torch.where(dead[None], hidden_pre, -math.inf).topk(k_aux, sorted=False)
        acts = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values)
        recons = (acts * (1 / self.W_dec.norm(dim=-1))) @ self.W_dec
        return self.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


class PeerTrainer:
    """``SAETrainer._train_step`` around a :class:`PeerSAE`."""

    def __init__(self, sae: PeerSAE, lr: float = 3e-4, autocast: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.sae = sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)
        device = sae.W_dec.device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
        self.since_fired = torch.zeros(sae.W_dec.shape[0], device=device)
        self.act_freq = torch.zeros(sae.W_dec.shape[0], device=device)

    def dead(self) -> torch.Tensor:
        return (self.since_fired > DEAD_FEATURE_WINDOW).bool()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One training step on ``x``; returns the (detached) loss."""
        self.sae.train()
        with self.autocast:
            loss, acts, _ = self.sae.losses(x, self.dead())
            with torch.no_grad():
                firing = acts.bool().float()
                did_fire = firing.sum(-2).bool()
                self.since_fired += 1
                self.since_fired[did_fire] = 0
                self.act_freq += firing.sum(0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()
