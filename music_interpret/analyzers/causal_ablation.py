"""Single-latent ablations: what removing one latent's decoded contribution does to MMT.

For latent j with code f_j(x) and decoder row W_dec[j], the activation x at the hook is
replaced by ``x - f_j(x) * W_dec[j]`` at the eligible tokens (see :mod:`.causal_data`); the
rest of the reconstruction and the dictionary's error term stay. Where f_j = 0 nothing
changes, so only the windows where j fires are run for j; a forward pass holds several
(latent, window) pairs, up to ``pass_tokens`` tokens.

Per song, summed over positions (divided by the counts only when reported, so that the
bootstrap can resample songs): the change of each field's next-token cross-entropy over
all scored positions and over the *firing* positions (selected positions where f_j > 0),
the KL divergence KL(p_clean || p_ablated) of each field's predicted distribution at the
firing positions, and for each label that the model predicts directly the clean probability
of the label's value and its change at the firing positions. The fields are the keys of
the adapter's ``patched_logits`` (MMT's six, a language model's one ``token``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..interfaces import Batch
from .causal_data import EvalData

if TYPE_CHECKING:
    from ..interfaces import ModelAdapter

#: MMT's output fields (an adapter's own are the keys its ``patched_logits`` returns)
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
    dce_all: np.ndarray  # (S, fields) ΔCE over every scored position
    dce_fire: np.ndarray  # (S, fields) ΔCE over the firing positions
    kl_fire: np.ndarray  # (S, fields) KL(clean || ablated) at the firing positions
    p_clean: np.ndarray  # (S, labels) clean label probability at the firing positions
    dp: np.ndarray  # (S, labels) its change (ablated - clean)
    fields: tuple[str, ...] = field(default=FIELDS)  # the model's output fields

    @classmethod
    def zeros(cls, n_songs: int, n_labels: int, fields: tuple[str, ...] = FIELDS) -> LatentSums:
        z, f = np.zeros, len(fields)
        return cls(z(n_songs), z(n_songs), z((n_songs, f)), z((n_songs, f)), z((n_songs, f)),
                   z((n_songs, n_labels)), z((n_songs, n_labels)), tuple(fields))


@torch.no_grad()
def firing_counts(adapter: ModelAdapter, hook: str, dictionary: Any, data: EvalData) -> tuple[np.ndarray, np.ndarray]:
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
def measure(adapter: ModelAdapter, hook: str, dictionary: Any, data: EvalData, latents: list[int],
            labels: list[LabelSpec], pass_tokens: int = 16_384,
            step: Callable[[], Any] | None = None) -> dict[int, LatentSums]:
    """Ablate every latent of ``latents`` alone; per-song sums (see the module doc).

    Only the windows where a latent fires are run for it: each pass holds (latent, window)
    pairs, at most ``pass_tokens`` tokens. ``step`` is called after each batch.
    """
    out: dict[int, LatentSums] = {}
    w_dec = dictionary.W_dec
    index = torch.as_tensor(latents, dtype=torch.long, device=w_dec.device)
    for eb in data.batches:
        captured: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor, store: dict[str, torch.Tensor] = captured) -> torch.Tensor:
            store["x"] = x
            return x

        clean_logits = adapter.patched_logits(eb.batch, hook, capture)
        if not out:
            out = {j: LatentSums.zeros(data.n_groups, len(labels), tuple(clean_logits)) for j in latents}
        x = captured["x"]
        device = x.device
        f = encode_columns(dictionary, x, index) * eb.eligible.to(device)[..., None]  # (B, T, K)
        rows, ks = (f > 0).any(1).nonzero(as_tuple=True)  # (window, latent) pairs that fire
        if len(rows):
            clean = _Clean.build(clean_logits, eb, device, labels)
            firing = (f[:, :-1] > 0) & eb.selected[:, :-1].to(device)[..., None]  # (B, T-1, K)
            per_pass = max(1, pass_tokens // int(eb.batch.codes.shape[1]))
            codes = torch.as_tensor(eb.batch.codes, device=device)
            mask = torch.as_tensor(eb.batch.mask, device=device)
            for start in range(0, len(rows), per_pass):
                r, k = rows[start : start + per_pass], ks[start : start + per_pass]
                delta = f[r, :, k][..., None] * w_dec[index[k]][:, None, :]  # (P, T, D)

                def ablate(x: torch.Tensor, d: torch.Tensor = delta) -> torch.Tensor:
                    return x - d.to(x.dtype)

                logits = adapter.patched_logits(Batch(codes[r], mask[r]), hook, ablate)
                sums = _pair_sums(clean, logits, r, firing[r, :, k].float(), f[r, :-1, k])
                group = eb.group[r.cpu().numpy()]
                for kk in k.unique().tolist():
                    sel = (k == kk).cpu().numpy()
                    _add(out[latents[kk]], group[sel], {n: v[sel] for n, v in sums.items()})
        if step is not None:
            step()
    return out


def _pair_sums(clean: _Clean, logits: dict[str, torch.Tensor], rows: torch.Tensor,
               fire: torch.Tensor, act: torch.Tensor) -> dict[str, np.ndarray]:
    """Per (latent, window) pair of one pass: the sums of :class:`LatentSums` (host arrays)."""
    fields = tuple(clean.lp)
    lp = {name: torch.log_softmax(logits[name][:, :-1].float(), -1) for name in fields}
    target = clean.target[rows]
    ce = torch.stack([-lp[name].gather(-1, target[..., i, None])[..., 0]
                      for i, name in enumerate(fields)])
    dce = ce - clean.ce[:, rows]  # (fields, P, T-1)
    kl = torch.stack([(clean.lp[n][rows].exp() * (clean.lp[n][rows] - lp[n])).sum(-1)
                      for n in fields])
    scored = clean.scored[rows].float()
    out = {"n_fire": _row_sums(fire), "act_fire": _row_sums(act * fire),
           "dce_all": _row_sums(dce * scored).T, "dce_fire": _row_sums(dce * fire).T,
           "kl_fire": _row_sums(kl * fire).T}
    p_clean = clean.p_label[:, rows]
    out["p_clean"] = _row_sums(p_clean * fire).T
    out["dp"] = _row_sums((_label_probs(lp, clean.labels) - p_clean) * fire).T
    return out


def _add(sums: LatentSums, group: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """Add per-pair values to one latent's per-song sums."""
    for name, v in values.items():
        np.add.at(getattr(sums, name), group, v)


@dataclass
class _Clean:
    """The clean pass of one batch at the scored positions."""

    lp: dict[str, torch.Tensor]  # field -> (B, T-1, V) log-probabilities
    target: torch.Tensor  # (B, T-1, fields) codes of the next tokens
    scored: torch.Tensor  # (B, T-1) bool
    ce: torch.Tensor  # (fields, B, T-1) clean cross-entropy
    p_label: torch.Tensor  # (labels, B, T-1) clean probability of each directly predicted label
    labels: list[LabelSpec]

    @classmethod
    def build(cls, logits: dict[str, torch.Tensor], eb: Any, device: torch.device,
              labels: list[LabelSpec]) -> _Clean:
        lp = {name: torch.log_softmax(logits[name][:, :-1].float(), -1) for name in logits}
        target = torch.as_tensor(eb.batch.codes, device=device)[:, 1:].long()
        if target.ndim == 2:  # one token id per row (a language model): one field
            target = target[..., None]
        ce = torch.stack([-lp[name].gather(-1, target[..., i, None])[..., 0]
                          for i, name in enumerate(lp)])
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


def scored_counts(data: EvalData) -> np.ndarray:
    """(S,) scored positions per song."""
    out = np.zeros(data.n_groups)
    for eb in data.batches:
        np.add.at(out, eb.group, eb.scored.sum(1).double().numpy())
    return out
