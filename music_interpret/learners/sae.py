"""``relu_l1``: the ReLU sparse autoencoder with an L1 penalty.

Preset ``default`` (current practice, after Anthropic's 2024 updates): decoder rows
initialised as random directions of norm 0.1 with the encoder tied to them,
``b_dec`` at the geometric median of a sample, inputs scaled so their mean L2 norm
is sqrt(d_in) (folded back into the saved weights), loss = squared error summed
over dimensions + ``l1_coeff`` * sum_i f_i ||W_dec[i]||, ``l1_coeff`` warmed up
linearly over the first 5% of steps, lr decayed linearly over the last 20%, gradient
norm clipped at 1.

Preset ``seed`` (the seed project's plain recipe): encoder N(0, 0.01), encoder bias
-1, ``b_dec`` zero and not subtracted from the input, no input scaling, loss =
mean squared error + ``l1_coeff`` * sum_i |f_i| (mean over tokens), decoder rows
renormalised to unit norm after each step, no warm-ups, constant lr, no clipping.

Every recipe option left out (``None``) takes the preset's value; options given
explicitly override the preset.

``target_l0``: instead of fixing the sparsity through ``l1_coeff``, ask for an L0 (mean
active latents per token); after the L1 warm-up the coefficient is multiplied by exp(s),
and every step s moves by ``target_l0_gain`` * clip(log(L0_batch / goal), -1, 1), on the
device (no host sync); under data-parallel training L0_batch is averaged over the ranks,
so every rank steers alike. The goal falls geometrically from the batch L0 at the end of
the warm-up to ``target_l0``, then stays there: a dictionary's L0 falls by itself while
its latents specialise, and a controller aimed at the final L0 from the start mistakes
that fall for a coefficient too small, drives the coefficient up and collapses the codes.
``target_l0_reach`` (a share of the steps after the warm-up) says when the goal reaches
the target; left out, the goal falls by ``TARGET_DESCENT`` (0.018) log L0 per step, so it
arrives as early as the controller can follow, but within 0.2-0.95 of those steps
(``TARGET_REACH``). A faster fall makes the L0 undershoot: the controller lags, and
latents silenced by an overshooting penalty do not come back. An earlier arrival leaves
more steps at the final sparsity, which pays. ``l1_coeff`` is the starting point; left
out, it is ``TARGET_START`` times the preset's (2 for ``default``), so the controller
climbs to the coefficient it needs rather than coming down to it.
``bench/sae_target_reach.py`` on ``bench/sae_equal_l0.py``'s data (target 32; held-out FVU
/ final L0): over 224 steps the goal starts at L0 2,070; arriving at 0.85 of the steps
(0.023 per step) ends at 0.129 / 25.1, at 0.95 (0.021, what the rule picks) at 0.099 /
31.7. Over 900 steps reach 0.3 gives 0.043 / 32.3, 0.5 0.051 / 32.2, 0.95 0.068 / 29.5,
and the rule (reach 0.26, 0.018 per step) 0.047 / 32.4: a slower fall did better there.
The rule was fitted on this one data set at these lengths. The controller's state is saved
with the checkpoints, so a resumed run goes on exactly.

``sparse_backward`` (``"auto"``, ``"always"``, ``"never"``; default ``"auto"``): on CPU,
when the batch's codes are sparse enough, everything after the encoder forward (decoder
forward, all gradients) works on the active (token, latent) pairs only, with the same
loss and gradients up to float32 rounding; see :mod:`~music_interpret.learners.sparse_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import gpu_step as GS
from . import sparse_step as SP
from .ddp import all_reduce_
from .dictionary import Dictionary, Learner, RecipeConfig, tied_init

TARGET_START = 0.4  # target_l0 without l1_coeff: start at this share of the preset's coefficient
# target_l0_reach left out: the goal falls by at most this much log L0 per step (faster, and
# the controller's lag makes the L0 undershoot the target), and reaches the target within
# these shares of the steps after the L1 warm-up.
TARGET_DESCENT = 0.018
TARGET_REACH = (0.2, 0.95)

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "lr": 5e-5, "l1_coeff": 5.0, "b_dec_init": "geometric_median", "input_scaling": "sample",
        "decoder_norm": "weighted", "remove_parallel_grad": True, "apply_b_dec_to_input": True,
        "init": "tied", "enc_bias_init": 0.0, "l1_warmup_fraction": 0.05, "lr_warmup_steps": 0,
        "lr_decay": "linear", "grad_clip": 1.0, "loss_mse": "sum",
    },
    "seed": {
        "lr": 1e-3, "l1_coeff": 1e-3, "b_dec_init": "zeros", "input_scaling": "none",
        "decoder_norm": "unit", "remove_parallel_grad": False, "apply_b_dec_to_input": False,
        "init": "normal", "enc_bias_init": -1.0, "l1_warmup_fraction": 0.0, "lr_warmup_steps": 0,
        "lr_decay": "constant", "grad_clip": 0.0, "loss_mse": "mean",
    },
}


@dataclass
class ReluL1Config(RecipeConfig):
    """Options of ``relu_l1`` (``None``: the preset's value).

    ``sparse_backward`` (shared with ``topk``): ``"auto"`` takes the sparse step on CPU
    when at most 10% of the codes of a batch are non-zero (and d_in * d_sae >= 32768),
    ``"always"`` takes it everywhere, ``"never"`` keeps the dense step.
    """

    preset: Literal["default", "seed"] = "default"
    l1_coeff: float | None = None
    l1_warmup_steps: int | None = None
    l1_warmup_fraction: float | None = None
    decoder_norm: Literal["weighted", "unit"] | None = None
    remove_parallel_grad: bool | None = None
    apply_b_dec_to_input: bool | None = None
    init: Literal["tied", "normal"] | None = None
    dec_init_norm: float = 0.1
    enc_bias_init: float | None = None
    loss_mse: Literal["sum", "mean"] | None = None
    target_l0: float | None = None
    target_l0_gain: float = 0.05
    target_l0_reach: float | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: {self.preset!r} is not a preset ({', '.join(PRESETS)})")
        self._check_common()
        if self.target_l0 is not None and self.l1_coeff is None:
            self.l1_coeff = TARGET_START * PRESETS[self.preset]["l1_coeff"]
        self.fill(PRESETS[self.preset])
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")
        if self.l1_warmup_steps is not None and self.l1_warmup_steps < 0:
            raise ValueError(f"l1_warmup_steps must be >= 0, got {self.l1_warmup_steps}")
        if not 0 <= self.l1_warmup_fraction <= 1:
            raise ValueError(f"l1_warmup_fraction must be in [0, 1], got {self.l1_warmup_fraction}")
        if not self.dec_init_norm > 0:
            raise ValueError(f"dec_init_norm must be positive, got {self.dec_init_norm}")
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise ValueError(f"target_l0 must be positive, got {self.target_l0}")
        if not self.target_l0_gain > 0:
            raise ValueError(f"target_l0_gain must be positive, got {self.target_l0_gain}")
        if self.target_l0_reach is not None and not 0 <= self.target_l0_reach <= 1:
            raise ValueError(f"target_l0_reach must be in [0, 1], got {self.target_l0_reach}")


class ReluL1Learner(Learner):
    """ReLU sparse autoencoder trained with an (optionally decoder-norm-weighted) L1 penalty."""

    name = "relu_l1"
    description = "ReLU sparse autoencoder with an L1 penalty (presets: default = current practice, seed)."
    Config = ReluL1Config
    architecture = "standard"

    def __init__(self, config: ReluL1Config | None = None) -> None:
        super().__init__(config)
        self._log_scale: torch.Tensor | None = None  # target_l0: log of the L1 multiplier
        self._log_start: torch.Tensor | None = None  # target_l0: log L0 where the goal starts

    def build(self, d_in: int, generator: torch.Generator) -> Dictionary:
        c: ReluL1Config = self.config
        model = Dictionary(d_in, c.size(d_in), apply_b_dec_to_input=c.apply_b_dec_to_input)
        if c.init == "tied":
            tied_init(model, generator, c.dec_init_norm)
        else:
            with torch.no_grad():
                model.W_enc.copy_(torch.randn(model.W_enc.shape, generator=generator) * 0.01)
                model.W_dec.copy_(torch.randn(model.W_dec.shape, generator=generator))
        with torch.no_grad():
            model.b_enc.fill_(c.enc_bias_init)
        if c.decoder_norm == "unit":
            model.normalize_decoder()
        return model

    def l1_warmup(self, total: int) -> int:
        c: ReluL1Config = self.config
        if c.l1_warmup_steps is not None:
            return c.l1_warmup_steps
        return int(round(c.l1_warmup_fraction * total))

    def _base_coeff(self, step: int, total: int) -> float:
        warmup = self.l1_warmup(total)
        factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return self.config.l1_coeff * factor

    def l1_coeff_at(self, step: int, total: int) -> float:
        """The L1 coefficient in force at ``step`` (with the target-L0 multiplier)."""
        scale = 1.0 if self._log_scale is None else float(self._log_scale.exp())
        return self._base_coeff(step, total) * scale

    def _scale(self, device: torch.device) -> torch.Tensor:
        if self._log_scale is None or self._log_scale.device != device:
            start = 0.0 if self._log_scale is None else float(self._log_scale)
            self._log_scale = torch.tensor(start, device=device)
        return self._log_scale

    @torch.no_grad()
    def _steer(self, l0: torch.Tensor, step: int, total: int) -> None:
        """Move the L1 multiplier towards the goal L0 of this step (after the L1 warm-up)."""
        c: ReluL1Config = self.config
        warmup = self.l1_warmup(total)
        if c.target_l0 is None or step < warmup:
            return
        l0 = all_reduce_(l0.detach().float().clone(), "mean")  # data-parallel: the global batch's L0
        log_l0 = torch.log(l0.clamp_min(1e-3))
        target = math.log(c.target_l0)
        if self._log_start is None or self._log_start.device != l0.device:
            start = log_l0 if self._log_start is None else self._log_start.to(l0.device)
            self._log_start = start.clamp_min(target)
        goal = self._goal(step - warmup, total - warmup, target)
        self._log_scale.add_(c.target_l0_gain * (log_l0 - goal).clamp_(-1.0, 1.0))

    def _goal(self, step: int, rest: int, target: float) -> torch.Tensor:
        """Log of the goal L0 ``step`` steps after the warm-up, of ``rest`` (a tensor: no sync)."""
        reach = self.config.target_l0_reach
        if reach is not None:
            span = reach * rest
            done = min(1.0, step / span) if span > 0 else 1.0
            return (1.0 - done) * self._log_start + done * target
        lo, hi = TARGET_REACH  # as fast as TARGET_DESCENT allows, within TARGET_REACH of the rest
        span = ((self._log_start - target) / TARGET_DESCENT).clamp(lo * rest, hi * rest)
        done = torch.where(span > 0, (step / span.clamp_min(1e-9)).clamp(max=1.0), 1.0)
        return (1.0 - done) * self._log_start + done * target

    def state_dict(self) -> dict[str, Any]:
        state = {} if self._log_scale is None else {"l1_log_scale": float(self._log_scale)}
        if self._log_start is not None:
            state["l1_log_start"] = float(self._log_start)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "l1_log_scale" in state:
            self._log_scale = torch.tensor(float(state["l1_log_scale"]))
        if "l1_log_start" in state:
            self._log_start = torch.tensor(float(state["l1_log_start"]))

    def loss(self, model: Dictionary, x: torch.Tensor, step: int, total: int,
             dead: torch.Tensor) -> dict[str, torch.Tensor]:
        c: ReluL1Config = self.config
        weighted = c.decoder_norm == "weighted"
        l1 = fired = None
        if GS.applies(c.sparse_backward, model, x):  # GPU: sparse decoder on the active pairs
            terms = GS.relu_l1_terms(model, x, weighted, None if c.sparse_backward == "always"
                                     else GS.GPU_MAX_DENSITY)
            f, recon, l1, fired = terms["codes"], terms["recon"], terms.get("l1"), terms.get("fired")
        elif SP.sparse_possible(c.sparse_backward, model, x):
            f = torch.relu_(model.pre_acts(x))  # in place: one (n, d_sae) buffer less
            if c.sparse_backward == "always" or SP.sparse_enough(f):
                recon, l1, fired = SP.relu_l1_terms(model, x, f, weighted)
                f = f.detach()
            else:
                recon = model.decode(f)
        else:
            _, f, recon = model.run(x)
        if l1 is None and weighted:  # f >= 0: a matvec, no float32 copy of the codes
            l1 = (f @ model.W_dec.norm(dim=1).to(f.dtype)).float().mean()
        elif l1 is None:
            l1 = f.sum(-1, dtype=torch.float32).mean()
        err = (recon.float() - x.float()).pow(2)
        mse = err.mean()
        recon_loss = err.sum(-1).mean() if c.loss_mse == "sum" else mse
        coeff = self._base_coeff(step, total)
        if c.target_l0 is not None:
            scale = self._scale(x.device)
            l0 = (fired.sum().float() / max(len(x), 1)) if fired is not None \
                else (f.detach() > 0).sum(-1).float().mean()
            loss = recon_loss + coeff * scale.exp() * l1
            self._steer(l0, step, total)
        else:
            loss = recon_loss + coeff * l1
        out = {"loss": loss, "mse": mse, "l1": l1, "aux": torch.zeros_like(mse), "codes": f,
               "recon": recon}
        return out if fired is None else {**out, "fired": fired}

    def before_step(self, model: Dictionary) -> None:
        if self.config.decoder_norm == "unit" and self.config.remove_parallel_grad:
            model.remove_parallel_grad()

    def after_step(self, model: Dictionary) -> None:
        if self.config.decoder_norm == "unit":
            model.normalize_decoder()
