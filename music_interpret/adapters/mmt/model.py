"""MMT's network in plain torch, with x-transformers 0.25.9 semantics and module names.

The module tree reproduces the ``state_dict`` keys of MMT's ``MusicXTransformer``
(``decoder.net.token_emb.{f}.emb.weight``, ``decoder.net.attn_layers.layers.{i}...``,
``decoder.net.norm``, ``decoder.net.to_logits.{f}``), so MMT checkpoints load with
``strict=True``. Attention runs through ``scaled_dot_product_attention``.

Masking follows x-transformers 0.25.9 exactly: a query attends to keys that are
earlier-or-equal and not padding; a padded query sees every score set to the same
value, so its softmax is uniform over all T positions. We get that by allowing every key
for a padded query row and zeroing its query vector (all scores 0).

Hook points: ``resid_pre.L`` (input of layer L), ``resid_mid.L`` (after its attention
residual), ``resid_post.L`` (after its feed-forward residual) and ``final_norm``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIM_HEAD = 64
FIELDS = ("type", "beat", "position", "pitch", "duration", "instrument")
Patch = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class MMTConfig:
    """Architecture of one MMT model (from ``train-args.json``)."""

    dim: int
    layers: int
    heads: int
    max_seq_len: int
    n_tokens: tuple[int, ...]
    abs_pos_emb: bool = True
    rel_pos_emb: bool = False
    dropout: float = 0.0
    attn_dropout: float | None = None  # None: ``dropout``, as MMT (training only)

    @property
    def attention_dropout(self) -> float:
        """Dropout on the attention weights; MMT uses ``dropout`` there too.

        Any value above 0 takes SDPA off its fused (flash) kernel on CPU onto the
        math path: a training step at 1024 tokens costs 2.5x (fp32) to 4x (bf16) as much.
        """
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def use_abs_pos(self) -> bool:
        """MMT adds the absolute embedding only if the layers carry no rotary positions."""
        return self.abs_pos_emb and not self.rel_pos_emb

    def describe(self) -> str:
        """Short human description, e.g. ``abs-pos MMT, 2 layers, dim 64, 4 heads``."""
        pos = "rotary" if self.rel_pos_emb else ("abs-pos" if self.use_abs_pos else "no-pos")
        return f"{pos} MMT, {self.layers} layers, dim {self.dim}, {self.heads} heads"


def hook_point_names(n_layers: int) -> list[str]:
    """Every hook point of an ``n_layers`` model, in forward order."""
    names = [
        f"{kind}.{i}" for i in range(n_layers) for kind in ("resid_pre", "resid_mid", "resid_post")
    ]
    return [*names, "final_norm"]


class TokenEmbedding(nn.Module):
    """One field's embedding (x-transformers ``TokenEmbedding``)."""

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions, scaled by ``dim ** -0.5``."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        return self.emb(torch.arange(n, device=device)) * self.scale


class RotaryEmbedding(nn.Module):
    """x-transformers rotary frequencies (``inv_freq`` is a persistent buffer)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.dim = dim

    def cos_sin(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables (n, dim) for positions 0..n-1."""
        inv_freq = self.inv_freq
        if inv_freq.dtype not in (torch.float32, torch.float64):  # keep angles accurate
            inv_freq = inv_freq.float()
        t = torch.arange(n, device=inv_freq.device, dtype=inv_freq.dtype)
        freqs = t[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Causal multi-head attention with 64-dim heads (names as in x-transformers)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * DIM_HEAD
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self._qkv_cache: tuple[tuple[object, ...], torch.Tensor] | None = None

    def qkv_weight(self) -> torch.Tensor:
        """``to_q|to_k|to_v`` weights stacked (3 inner, dim), for one fused projection.

        Without autograd the stacked copy is cached, keyed on the three weights' storage
        addresses, version counters, dtypes and devices, so ``load_state_dict``, ``.to()``
        and in-place updates invalidate it. The key holds detached aliases of the weights,
        which keeps their storage (and so its address) from being reused while cached.
        With autograd the stack is rebuilt on every call.
        """
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return torch.cat(ws)
        try:
            stamp = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
        except RuntimeError:  # inference tensors carry no version counter
            return torch.cat(ws)
        if self._qkv_cache is None or self._qkv_cache[0][0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # a normal, reusable tensor
                self._qkv_cache = ((stamp, *(w.detach() for w in ws)), torch.cat(ws))
        return self._qkv_cache[1]

    def forward(
        self,
        x: torch.Tensor,
        masking: Masking,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = F.linear(x, self.qkv_weight()).view(b, t, 3, self.heads, DIM_HEAD)
        if rotary is not None:  # x-transformers 0.25.9 rotates q, k and v
            cos, sin = rotary  # in the projection's dtype (bf16 under autocast)
            qkv = _apply_rotary(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        if masking.attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            if masking.query is not None:  # right padding: padded queries average all of v
                out = torch.where(masking.query, out, v.mean(dim=-2, keepdim=True))
        else:  # general mask: a zero query scores 0 everywhere, i.e. a uniform softmax
            q = q * masking.query.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masking.attn_mask, dropout_p=p)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


def _apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``r`` channels of every head of ``qkv`` (B, T, 3, H, D).

    x-transformers: ``t * cos + rotate_half(t) * sin`` with ``rotate_half`` pairing channel
    j with j + r/2, i.e. ``y1 = x1 cos - x2 sin``, ``y2 = x2 cos + x1 sin``. ``cos``/``sin``
    (T, r) repeat their first half, so the half tables suffice. Without autograd ``qkv``
    (a fresh projection output) is updated in place, with the same roundings.
    """
    r = cos.shape[-1]
    h = r // 2
    c = cos[:, None, None, :h]
    s = sin[:, None, None, :h]
    x1, x2 = qkv[..., :h], qkv[..., h:r]
    if torch.is_grad_enabled():
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, qkv[..., r:]), dim=-1)
    x1_sin = x1 * s
    x1.mul_(c).sub_(x2 * s)
    x2.mul_(c).add_(x1_sin)
    return qkv


class FeedForward(nn.Module):
    """Linear(dim, 4 dim) + GELU + Linear(4 dim, dim); indices match x-transformers."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = 4 * dim
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()),
            nn.Identity(),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Residual(nn.Module):
    """Residual add (parameter-free, kept for the module layout).

    With ``inplace`` the branch output ``x`` is overwritten with the sum; callers pass
    it only when ``x`` is a fresh tensor nobody else holds (see :func:`_owns_outputs`).
    """

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, inplace: bool = False
    ) -> torch.Tensor:
        return x.add_(residual) if inplace else x + residual


def _owns_outputs(module: nn.Module) -> bool:
    """True if ``module``'s outputs are fresh tensors we may overwrite: autograd is off
    and no forward hook (global, or on ``module`` or a submodule) could keep or replace
    them."""
    if torch.is_grad_enabled() or nn.modules.module._global_forward_hooks:
        return False
    return not any(m._forward_hooks for m in module.modules())


def _block(norm_dim: int, fn: nn.Module) -> nn.ModuleList:
    return nn.ModuleList([nn.ModuleList([nn.LayerNorm(norm_dim)]), fn, Residual()])


class AttentionLayers(nn.Module):
    """Pre-norm decoder stack: ``layers[2L]`` attention, ``layers[2L+1]`` feed-forward."""

    def __init__(self, cfg: MMTConfig) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.rotary_pos_emb = RotaryEmbedding(max(DIM_HEAD // 2, 32)) if cfg.rel_pos_emb else None
        layers = []
        for _ in range(cfg.layers):
            layers.append(_block(cfg.dim, Attention(cfg.dim, cfg.heads, cfg.attention_dropout)))
            layers.append(_block(cfg.dim, FeedForward(cfg.dim, cfg.dropout)))
        self.layers = nn.ModuleList(layers)


class MusicTransformerWrapper(nn.Module):
    """Embeddings, attention layers, final norm and the six heads (``decoder.net``)."""

    def __init__(self, cfg: MMTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = cfg.max_seq_len
        self.token_emb = nn.ModuleList([TokenEmbedding(cfg.dim, n) for n in cfg.n_tokens])
        self.pos_emb = (
            AbsolutePositionalEmbedding(cfg.dim, cfg.max_seq_len) if cfg.use_abs_pos else None
        )
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_layers = AttentionLayers(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.ModuleList([nn.Linear(cfg.dim, n) for n in cfg.n_tokens])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the six field embeddings plus the scaled absolute position embedding."""
        x = self.token_emb[0](codes[..., 0])
        for i in range(1, len(self.token_emb)):
            x = x + self.token_emb[i](codes[..., i])
        if self.pos_emb is not None:
            x = x + self.pos_emb(codes.shape[1], codes.device)
        return self.emb_dropout(x)

    def run(
        self,
        codes: torch.Tensor,
        mask: torch.Tensor | None = None,
        capture: Iterable[str] = (),
        patch: Patch | None = None,
        logits: bool = True,
    ) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor]]:
        """Forward pass on codes (B, T, 6) with optional hooks.

        ``capture`` names hook points whose activations are returned; ``patch``
        ``(name, fn)`` replaces the activation at ``name`` by ``fn(activation)``.
        Without ``logits`` the pass stops after the last hook point needed.
        Returns (list of six logits (B, T, n_f) or None, {hook point: activation}).
        """
        capture = set(capture)
        needed = capture | ({patch[0]} if patch else set())
        order = hook_point_names(len(self.attn_layers.layers) // 2)
        if needed - set(order):
            raise ValueError(f"unknown hook points {sorted(needed - set(order))}; have {order}")
        last = max((order.index(n) for n in needed), default=-1) if not logits else len(order)
        acts: dict[str, torch.Tensor] = {}

        def hook(name: str, x: torch.Tensor) -> torch.Tensor:
            if patch is not None and name == patch[0]:
                x = patch[1](x)
            if name in capture:
                acts[name] = x
            return x

        t = codes.shape[1]
        x = self.embed(codes)
        masking = Masking.build(mask, t)
        rotary = None
        if self.attn_layers.rotary_pos_emb is not None:
            rotary = self.attn_layers.rotary_pos_emb.cos_sin(t, x.dtype)
        step = 0
        layers = self.attn_layers.layers
        for i in range(0, len(layers), 2):
            (a_norm,), attn, a_res = layers[i]
            (f_norm,), ff, f_res = layers[i + 1]
            L = i // 2
            x = hook(f"resid_pre.{L}", x)
            if step >= last:
                return None, acts
            x = a_res(attn(a_norm(x), masking, rotary), x, _owns_outputs(attn))
            x = hook(f"resid_mid.{L}", x)
            if step + 1 >= last:
                return None, acts
            x = f_res(ff(f_norm(x)), x, _owns_outputs(ff))
            x = hook(f"resid_post.{L}", x)
            if step + 2 >= last:
                return None, acts
            step += 3
        x = hook("final_norm", self.norm(x))
        if not logits:
            return None, acts
        return [head(x) for head in self.to_logits], acts

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Six logits (B, T, n_f) over every position, like MMT's ``decoder.net``."""
        out, _ = self.run(codes, mask)
        assert out is not None
        return out


@dataclass(frozen=True)
class Masking:
    """How attention reproduces x-transformers' (query AND key AND causal) mask.

    * nothing padded: ``query`` and ``attn_mask`` are None (plain causal SDPA);
    * right padding (each mask row is a prefix): causal SDPA, whose real rows never see
      padding, then padded query rows replaced by the mean of v (uniform attention);
    * any other mask: ``attn_mask`` (B, 1, T, T) allows every key to a padded query, whose
      query vector is zeroed so that all its scores are equal.

    ``query`` is the (B, 1, T, 1) bool mask of real queries.
    """

    query: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    @staticmethod
    def build(mask: torch.Tensor | None, t: int, general: bool = False) -> Masking:
        """Masking for a (B, T) padding mask; ``general`` forces the explicit-mask path."""
        if mask is None:
            return Masking()
        mask = mask.bool()
        if bool(mask.all()):
            return Masking()
        query = mask[:, None, :, None]
        if not general and not bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            return Masking(query=query)
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril_()
        allowed = (causal[None] & mask[:, None, :]) | ~mask[:, :, None]
        return Masking(query=query, attn_mask=allowed[:, None])


class MusicAutoregressiveWrapper(nn.Module):
    """Holds ``net`` (``decoder.net``), as MMT's autoregressive wrapper does."""

    def __init__(self, net: MusicTransformerWrapper) -> None:
        super().__init__()
        self.net = net
        self.max_seq_len = net.max_seq_len


class MMTModel(nn.Module):
    """MMT's ``MusicXTransformer``: ``decoder`` wraps ``decoder.net``."""

    def __init__(self, cfg: MMTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = MusicAutoregressiveWrapper(MusicTransformerWrapper(cfg))

    @property
    def net(self) -> MusicTransformerWrapper:
        """The transformer itself (``decoder.net``)."""
        return self.decoder.net

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Six logits (B, T, n_f)."""
        return self.net(codes, mask)


def mmt_training_loss(
    model: MMTModel, seq: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MMT's training loss: the body runs on ``seq[:, :-1]`` (and ``mask[:, :-1]``),
    targets are ``seq[:, 1:]`` and each field's cross-entropy is averaged over every
    position, padding included (padding targets are the valid class 0).

    Returns (sum of the six losses, list of the six per-field losses).
    """
    logits = model.net(seq[:, :-1], None if mask is None else mask[:, :-1])
    target = seq[:, 1:]
    losses = [F.cross_entropy(lg.transpose(1, 2), target[..., i]) for i, lg in enumerate(logits)]
    return sum(losses[1:], losses[0]), losses


def field_losses(
    logits: Sequence[torch.Tensor], codes: torch.Tensor, mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy per field over real targets only, plus ``total``.

    ``logits`` come from a pass over the whole ``codes`` (B, T, 6); position t predicts
    code t+1, and only targets where ``mask[:, 1:]`` is True count.
    """
    target = codes[:, 1:]
    keep = None if mask is None else mask[:, 1:].reshape(-1)
    out: dict[str, torch.Tensor] = {}
    for i, (name, lg) in enumerate(zip(FIELDS, logits, strict=True)):
        flat = lg[:, :-1].reshape(-1, lg.shape[-1]).float()
        tgt = target[..., i].reshape(-1)
        if keep is not None:
            flat, tgt = flat[keep], tgt[keep]
        out[name] = F.cross_entropy(flat, tgt)
    out["total"] = torch.stack([out[f] for f in FIELDS]).sum()
    return out
