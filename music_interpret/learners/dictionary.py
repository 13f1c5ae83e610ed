"""The dictionary model both learners train, its recipe options and its initialisation.

A dictionary maps an activation ``x`` (d_in) to codes ``f`` (d_sae) and back::

    pre = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted when apply_b_dec_to_input)
    f   = relu(pre)                          (relu_l1)  or  relu(top-k of pre)  (topk)
    x^  = f @ W_dec + b_dec

Training happens on normalised inputs ``(x - shift) * scale``; :meth:`Dictionary.folded`
turns the trained weights into the equivalent dictionary on raw activations, the space
every saved dictionary acts on. A loaded dictionary knows the mean L2 norm of the raw
activations it was trained on (``input_norm``), and :meth:`Dictionary.encode` refuses
batches whose mean norm is off by more than a factor of two (normalised batches, say):
:meth:`Dictionary.for_normalized` gives the dictionary for a loader's normalised batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..interfaces import DictionaryLearner

EPS = 1e-8
INPUT_NORM_BAND = 2.0  # encode refuses batches whose mean norm is off by more than this factor
INPUT_CHECK_MIN_TOKENS = 16  # (fewer tokens: too noisy to judge)
SPARSE_MODES = ("auto", "always", "never")  # RecipeConfig.sparse_backward, see sparse_step


class InputSpaceError(ValueError):
    """Activations given to a dictionary are not in the space it acts on."""


class Dictionary(nn.Module):
    """Sparse autoencoder with a ReLU (``k=None``) or top-k activation.

    ``input_norm``: mean L2 norm of the activations the dictionary acts on (raw
    activations for a saved dictionary), when known; :meth:`encode` checks batches
    against it.
    """

    input_norm: float | None = None

    def __init__(self, d_in: int, d_sae: int, *, k: int | None = None,
                 apply_b_dec_to_input: bool = True) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.k = int(d_in), int(d_sae), k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` (``x @ W_enc + b_enc`` without ``apply_b_dec_to_input``).

        When ``b_dec`` takes gradients, the input is shifted by a detached ``b_dec`` and
        ``b_dec``'s gradient flows through ``(sg(b_dec) - b_dec) @ W_enc``, a vector that
        is exactly zero: the same values and gradients as the plain formula, but autograd
        no longer needs the (n, d_in) gradient of the shifted input, one (n x d_in x
        d_sae) matmul of the backward pass.
        """
        bias = self.b_enc
        if self.apply_b_dec_to_input:
            b_dec = self.b_dec.detach()
            if torch.is_grad_enabled() and self.b_dec.requires_grad:
                bias = bias + (b_dec - self.b_dec) @ self.W_enc
            x = x - b_dec
        if x.dim() == 2:  # bias inside the matmul: a pass less, and under autocast the
            return torch.addmm(bias, x, self.W_enc)  # result stays bf16 (no float32 promotion)
        return x @ self.W_enc + bias

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            return torch.relu(pre)
        values, index = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (..., d_sae) of activations (..., d_in), in the space the dictionary acts on
        (raw activations for a saved one; checked against ``input_norm``)."""
        self.check_input(x)
        return self.activate(self.pre_acts(x))

    @torch.no_grad()
    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputSpaceError` when the batch's mean norm is more than a factor of
        ``INPUT_NORM_BAND`` away from ``input_norm`` (batches of 16 tokens or more)."""
        if not self.input_norm or x.dim() < 2 or x[..., 0].numel() < INPUT_CHECK_MIN_TOKENS:
            return
        got = float(x.float().norm(dim=-1).mean())
        if INPUT_NORM_BAND ** -1 <= got / self.input_norm <= INPUT_NORM_BAND:
            return
        hook = (getattr(self, "config", None) or {}).get("hook_point") or "its hook point"
        raise InputSpaceError(
            f"inputs are not in the dictionary's space: their mean L2 norm is {got:.4g}, the "
            f"activations this dictionary acts on (raw activations of {hook}) have {self.input_norm:.4g}. "
            "Feed raw activations (ActivationLoader(..., normalization='none')), or encode "
            "normalised batches with dictionary.for_normalized(loader.normalizer)")

    def for_normalized(self, normalizer: Any) -> Dictionary:
        """The same dictionary acting on ``normalizer``'s outputs ``(x - shift) * scale``
        (a loader's normalised batches); codes are equal, reconstructions normalised too."""
        shift = torch.as_tensor(normalizer.shift, dtype=torch.float32)
        scale = torch.as_tensor(normalizer.scale, dtype=torch.float32)
        out = self.folded(-shift * scale, 1.0 / scale)  # raw x = y / scale + shift
        constant = bool((scale == scale[0]).all())
        out.input_norm = self.input_norm * float(scale[0]) if self.input_norm and constant else None
        out.config = {**(getattr(self, "config", None) or {}), "activation_space": normalizer.mode}
        return out.eval().requires_grad_(self.W_enc.requires_grad)

    @torch.no_grad()
    def encode_host(self, x: torch.Tensor | Any) -> torch.Tensor:
        """Codes of activations held on the host (a CPU tensor or array), computed on the
        dictionary's device and returned as a float32 CPU tensor: the one place where
        analyses move activations to a dictionary on another device and codes back."""
        device = self.W_enc.device
        t = torch.as_tensor(x)
        t = t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t
        return self.encode(t.to(device, self.W_enc.dtype, non_blocking=True)).float().cpu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction (..., d_in) from codes (..., d_sae)."""
        if f.dim() == 2 and not f.is_sparse:
            return torch.addmm(self.b_dec, f, self.W_dec)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre-activations, codes, reconstruction): what a training step needs."""
        pre = self.pre_acts(x)
        f = self.activate(pre)
        return pre, f, self.decode(f)

    # -- constraints ---------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(EPS)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the component of each decoder row's gradient along the row (keeps norms ~1)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(EPS)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    # -- raw space -----------------------------------------------------------------------

    @torch.no_grad()
    def folded(self, shift: torch.Tensor, scale: torch.Tensor) -> Dictionary:
        """The same dictionary acting on raw ``x``, for training inputs ``(x - shift) * scale``."""
        shift = shift.to(self.W_enc)
        scale = scale.to(self.W_enc)
        out = Dictionary(self.d_in, self.d_sae, k=self.k, apply_b_dec_to_input=self.apply_b_dec_to_input)
        out.to(self.W_enc.device)
        out.W_enc.copy_(scale[:, None] * self.W_enc)
        out.W_dec.copy_(self.W_dec / scale[None, :])
        out.b_dec.copy_(self.b_dec / scale + shift)
        if self.apply_b_dec_to_input:  # (x - b_dec') * scale == (x - shift) * scale - b_dec
            out.b_enc.copy_(self.b_enc)
        else:
            out.b_enc.copy_(self.b_enc - (shift * scale) @ self.W_enc)
        return out


def geometric_median(x: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iterations for the point minimising the summed distances to the rows of ``x``."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= 1e-7 * max(1.0, float(y.norm())):
            y = y_next
            break
        y = y_next
    return y.float()


def lr_factor(step: int, total: int, warmup: int, decay: str, decay_fraction: float) -> float:
    """Multiplier of the base learning rate for update ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    n_decay = int(round(decay_fraction * total)) if decay != "constant" else 0
    start = total - n_decay
    if n_decay <= 0 or step < start:
        return 1.0
    t = (step - start + 1) / n_decay
    return 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class RecipeConfig:
    """Options every learner shares. ``None`` means: the learner's (or preset's) default."""

    d_sae: int | None = None
    expansion: int = 8
    lr: float | None = None
    batch_size: int = 4096
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    b_dec_init: Literal["geometric_median", "mean", "zeros"] | None = None
    input_scaling: Literal["sample", "stats", "none"] | None = None
    init_sample_tokens: int = 65_536
    lr_warmup_steps: int | None = None
    lr_decay: Literal["constant", "linear", "cosine"] | None = None
    lr_decay_fraction: float = 0.2
    grad_clip: float | None = None
    bf16: bool = False
    compile: bool = False
    sparse_backward: Literal["auto", "always", "never"] = "auto"
    seed: int | None = None

    def _check_common(self) -> None:
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        if self.expansion < 1:
            raise ValueError(f"expansion must be positive, got {self.expansion}")
        if self.batch_size < 1 or self.init_sample_tokens < 1:
            raise ValueError("batch_size and init_sample_tokens must be positive")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.sparse_backward not in SPARSE_MODES:
            raise ValueError("sparse_backward must be auto, always or never, "
                             f"got {self.sparse_backward!r}")

    def fill(self, defaults: dict[str, Any]) -> None:
        """Replace every ``None`` option by its entry in ``defaults``."""
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def size(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in


class Learner(DictionaryLearner):
    """What the trainer asks of a learner: a model, a loss and the per-step constraints."""

    architecture: str = "standard"

    def build(self, d_in: int, generator: torch.Generator) -> Dictionary:
        raise NotImplementedError

    def loss(self, model: Dictionary, x: torch.Tensor, step: int, total: int,
             dead: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` (to minimise), ``mse``, ``l1``, ``aux`` and ``codes``, ``recon``; optionally
        ``fired`` (d_sae,): on how many tokens each latent fired (else counted from ``codes``)."""
        raise NotImplementedError

    def lr_at(self, step: int, total: int) -> float:
        c = self.config
        warmup = c.lr_warmup_steps if c.lr_warmup_steps is not None else 0
        return c.lr * lr_factor(step, total, warmup, c.lr_decay, c.lr_decay_fraction)

    def l1_coeff_at(self, step: int, total: int) -> float:
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        """State the learner keeps across steps (saved in checkpoints; empty by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""

    def before_step(self, model: Dictionary) -> None:
        """Called between ``backward`` and the optimiser step."""

    def after_step(self, model: Dictionary) -> None:
        """Called after the optimiser step."""

    @torch.no_grad()
    def init_b_dec(self, model: Dictionary, sample: torch.Tensor) -> None:
        """Initialise ``b_dec`` from a sample of (scaled) training inputs."""
        how = self.config.b_dec_init
        if how == "geometric_median":
            model.b_dec.copy_(geometric_median(sample))
        elif how == "mean":
            model.b_dec.copy_(sample.mean(0))
        else:
            model.b_dec.zero_()


def tied_init(model: Dictionary, generator: torch.Generator, norm: float) -> None:
    """Decoder rows: random directions of length ``norm``; encoder = decoder transposed; b_enc = 0."""
    with torch.no_grad():
        w = torch.randn(model.d_sae, model.d_in, generator=generator)
        w *= norm / w.norm(dim=1, keepdim=True).clamp_min(EPS)
        model.W_dec.copy_(w)
        model.W_enc.copy_(w.T)
        model.b_enc.zero_()
