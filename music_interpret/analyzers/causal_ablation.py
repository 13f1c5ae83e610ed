"""Single-latent ablations: what removing one latent's decoded contribution does to MMT.

For latent j with code f_j(x) and decoder row W_dec[j], the activation x at the hook is
replaced by ``x - f_j(x) * W_dec[j]`` at the eligible tokens (see :mod:`.causal_data`); the
rest of the reconstruction and the dictionary's error term stay. Where f_j = 0 nothing
changes, so only batches where j fires are run, several latents at once (the batch
repeated once per latent, up to ``pass_tokens`` tokens a pass).

Per song, summed over positions (divided by the counts only when reported, so that the
bootstrap can resample songs): the change of each field's next-token cross-entropy over
all scored positions and over the *firing* positions (selected positions where f_j > 0),
the KL divergence KL(p_clean || p_ablated) of each field's predicted distribution at the
firing positions, and for each label that MMT predicts directly the clean probability of
the label's value and its change at the firing positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..interfaces import Batch
from .causal_data import EvalData

FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
CHUNK = 2048  # tokens encoded at once with every latent


@dataclass(frozen=True)
class LabelSpec:
    """A label and what its effect is read from: ``codes`` of ``field`` (the label's predicted
    probability) when the model predicts it directly, else the cross-entropy of ``field``
    (``total``: the sum over fields)."""

    name: str
    field: str
    codes: tuple[int, ...] | None = None


@dataclass
class LatentSums:
    """Per-song sums of one latent's ablation (arrays with the song on axis 0)."""

    n_fire: np.ndarray  # (S,) firing positions
    act_fire: np.ndarray  # (S,) summed activation at them
    dce_all: np.ndarray  # (S, 6) ΔCE over every scored position
    dce_fire: np.ndarray  # (S, 6) ΔCE over the firing positions
    kl_fire: np.ndarray  # (S, 6) KL(clean || ablated) at the firing positions
    p_clean: np.ndarray  # (S, labels) clean label probability at the firing positions
    dp: np.ndarray  # (S, labels) its change (ablated - clean)

    @classmethod
    def zeros(cls, n_songs: int, n_labels: int) -> LatentSums:
        z = np.zeros
        return cls(z(n_songs), z(n_songs), z((n_songs, 6)), z((n_songs, 6)), z((n_songs, 6)),
                   z((n_songs, n_labels)), z((n_songs, n_labels)))


@torch.no_grad()
def firing_counts(adapter: Any, hook: str, dictionary: Any, data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """(firings, summed activation) of every latent over the selected, eligible positions."""
    counts = torch.zeros(dictionary.d_sae, dtype=torch.float64)
    mass = torch.zeros(dictionary.d_sae, dtype=torch.float64)
    for eb in data.batches:
        x = adapter.run_with_hooks(eb.batch, [hook])[hook]
        rows = x[(eb.selected & eb.eligible).to(x.device)]
        for start in range(0, len(rows), CHUNK):
            f = dictionary.encode(rows[start : start + CHUNK].to(dictionary.W_enc.dtype))
            counts += (f > 0).sum(0).double().cpu()
            mass += f.sum(0).double().cpu()
    return counts.numpy(), mass.numpy()


def encode_columns(dictionary: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Codes of the latents ``index`` only, (..., K): for a ReLU dictionary from those columns
    of the encoder; for a top-k one from the full codes, in chunks of ``CHUNK`` tokens."""
    x = x.to(dictionary.W_enc.dtype)
    if dictionary.k is None:
        if dictionary.apply_b_dec_to_input:
            x = x - dictionary.b_dec
        return torch.relu(x @ dictionary.W_enc[:, index] + dictionary.b_enc[index])
    flat = x.reshape(-1, x.shape[-1])
    parts = [dictionary.encode(flat[s : s + CHUNK])[:, index] for s in range(0, len(flat), CHUNK)]
    return torch.cat(parts).reshape(*x.shape[:-1], len(index))


def _row_sums(values: torch.Tensor) -> np.ndarray:
    """Sum over the last axis (positions) as float64 on the host."""
    return values.double().sum(-1).cpu().numpy()


@torch.no_grad()
def measure(adapter: Any, hook: str, dictionary: Any, data: EvalData, latents: list[int],
            labels: list[LabelSpec], pass_tokens: int = 16_384,
            step: Callable[[], Any] | None = None) -> dict[int, LatentSums]:
    """Ablate every latent of ``latents`` alone; per-song sums (see the module doc).
    ``step`` is called after each batch (a progress bar)."""
    out = {j: LatentSums.zeros(data.n_groups, len(labels)) for j in latents}
    w_dec = dictionary.W_dec
    index = torch.as_tensor(latents, dtype=torch.long, device=w_dec.device)
    for eb in data.batches:
        captured: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor, store: dict[str, torch.Tensor] = captured) -> torch.Tensor:
            store["x"] = x
            return x

        clean = adapter.patched_logits(eb.batch, hook, capture)
        x = captured["x"]
        device = x.device
        eligible = eb.eligible.to(device)
        f = encode_columns(dictionary, x, index) * eligible[..., None]  # (B, T, K)
        firing = (f[:, :-1] > 0) & eb.selected[:, :-1].to(device)[..., None]  # (B, T-1, K)
        active = [k for k in range(len(latents)) if bool((f[..., k] > 0).any())]
        if step is not None:
            step()
        if not active:
            continue
        ctx = _Clean.build(clean, eb, device, labels)
        b, t = eb.rows, int(eb.batch.codes.shape[1])
        per_pass = max(1, pass_tokens // max(b * t, 1))
        for start in range(0, len(active), per_pass):
            ks = active[start : start + per_pass]
            delta = f[..., ks].permute(2, 0, 1)[..., None] * w_dec[index[ks]][:, None, None, :]
            g = len(ks)
            big = Batch(eb.batch.codes.repeat(g, 1, 1), eb.batch.mask.repeat(g, 1))

            def ablate(x: torch.Tensor, d: torch.Tensor = delta) -> torch.Tensor:
                return x - d.reshape(x.shape).to(x.dtype)

            logits = adapter.patched_logits(big, hook, ablate)
            for gi, k in enumerate(ks):
                part = {name: lg[gi * b : (gi + 1) * b] for name, lg in logits.items()}
                fire = firing[..., k]
                _accumulate(out[latents[k]], ctx, part, fire, f[:, :-1, k], eb.group)
    return out


@dataclass
class _Clean:
    """The clean pass of one batch at the scored positions."""

    lp: dict[str, torch.Tensor]  # field -> (B, T-1, V) log-probabilities
    target: torch.Tensor  # (B, T-1, 6) codes of the next tokens
    scored: torch.Tensor  # (B, T-1) bool
    ce: torch.Tensor  # (6, B, T-1) clean cross-entropy
    p_label: torch.Tensor  # (labels, B, T-1) clean probability of each directly predicted label
    labels: list[LabelSpec]

    @classmethod
    def build(cls, logits: dict[str, torch.Tensor], eb: Any, device: torch.device,
              labels: list[LabelSpec]) -> _Clean:
        lp = {name: torch.log_softmax(logits[name][:, :-1].float(), -1) for name in FIELDS}
        target = torch.as_tensor(eb.batch.codes, device=device)[:, 1:].long()
        ce = torch.stack([-lp[name].gather(-1, target[..., i, None])[..., 0]
                          for i, name in enumerate(FIELDS)])
        return cls(lp, target, eb.scored[:, :-1].to(device), ce, _label_probs(lp, labels), labels)


def _label_probs(lp: dict[str, torch.Tensor], labels: list[LabelSpec]) -> torch.Tensor:
    """(labels, B, T-1): the summed probability of each label's codes (0 for labels without)."""
    shape = next(iter(lp.values())).shape[:-1]
    rows = []
    for spec in labels:
        if spec.codes is None:
            rows.append(torch.zeros(shape, device=next(iter(lp.values())).device))
            continue
        codes = torch.as_tensor(spec.codes, dtype=torch.long, device=lp[spec.field].device)
        rows.append(lp[spec.field].index_select(-1, codes).exp().sum(-1))
    if not rows:
        return torch.zeros((0, *shape), device=next(iter(lp.values())).device)
    return torch.stack(rows)


def _accumulate(sums: LatentSums, clean: _Clean, logits: dict[str, torch.Tensor],
                fire: torch.Tensor, act: torch.Tensor, group: np.ndarray) -> None:
    """Add one batch's ablation to ``sums`` (rows to their songs)."""
    lp = {name: torch.log_softmax(logits[name][:, :-1].float(), -1) for name in FIELDS}
    ce = torch.stack([-lp[name].gather(-1, clean.target[..., i, None])[..., 0]
                      for i, name in enumerate(FIELDS)])
    dce = ce - clean.ce  # (6, B, T-1)
    kl = torch.stack([(clean.lp[n].exp() * (clean.lp[n] - lp[n])).sum(-1) for n in FIELDS])
    scored, fire_f = clean.scored.float(), fire.float()
    np.add.at(sums.n_fire, group, _row_sums(fire_f))
    np.add.at(sums.act_fire, group, _row_sums(act * fire_f))
    np.add.at(sums.dce_all, group, _row_sums(dce * scored).T)
    np.add.at(sums.dce_fire, group, _row_sums(dce * fire_f).T)
    np.add.at(sums.kl_fire, group, _row_sums(kl * fire_f).T)
    if clean.labels:
        p = _label_probs(lp, clean.labels)
        np.add.at(sums.p_clean, group, _row_sums(clean.p_label * fire_f).T)
        np.add.at(sums.dp, group, _row_sums((p - clean.p_label) * fire_f).T)


def scored_counts(data: EvalData) -> np.ndarray:
    """(S,) scored positions per song."""
    out = np.zeros(data.n_groups)
    for eb in data.batches:
        np.add.at(out, eb.group, eb.scored.sum(1).double().numpy())
    return out
