"""Reference MMT forward built on x-transformers 0.25.9 (benchmark environment only).

A hand-written wrapper around x-transformers' ``Decoder``, ``TokenEmbedding`` and
``AbsolutePositionalEmbedding`` whose attribute names follow the MMT checkpoint layout
(``decoder.net.token_emb.{f}``, ``decoder.net.pos_emb``, ``decoder.net.attn_layers``,
``decoder.net.norm``, ``decoder.net.to_logits.{f}``), so MMT checkpoints load with
``strict=True``. Runs only under ``bench/.venv-xt/bin/python``; it imports nothing from
``music_interpret``.

``check_fixtures()`` compares its logits with the forward references in
``tests/fixtures/mmt/reference/{ape-tiny,rpe-tiny}.npz`` on real positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from x_transformers.x_transformers import (
    AbsolutePositionalEmbedding,
    Decoder,
    TokenEmbedding,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mmt"
FIXTURE_RUNS = ("ape-tiny", "rpe-tiny")
FIXTURE_TOL = 1e-5


@dataclass(frozen=True)
class RefConfig:
    """Architecture of the reference model (MMT's ``train.py`` arguments)."""

    dim: int
    layers: int
    heads: int
    max_seq_len: int
    n_tokens: tuple[int, ...]
    abs_pos_emb: bool = True
    rel_pos_emb: bool = False


class RefNet(nn.Module):
    """``decoder.net``: six field embeddings, x-transformers decoder, norm, six heads."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.attn_layers = Decoder(
            dim=cfg.dim, depth=cfg.layers, heads=cfg.heads, rotary_pos_emb=cfg.rel_pos_emb
        )
        self.token_emb = nn.ModuleList([TokenEmbedding(cfg.dim, n) for n in cfg.n_tokens])
        # the absolute embedding exists only if the layers carry no positional scheme
        use_abs = cfg.abs_pos_emb and not self.attn_layers.has_pos_emb
        self.pos_emb = AbsolutePositionalEmbedding(cfg.dim, cfg.max_seq_len) if use_abs else None
        self.emb_dropout = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.ModuleList([nn.Linear(cfg.dim, n) for n in cfg.n_tokens])

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Six logits (B, T, n_f) for codes (B, T, 6) and an optional (B, T) bool mask."""
        x = sum(emb(codes[..., i]) for i, emb in enumerate(self.token_emb))
        if self.pos_emb is not None:
            x = x + self.pos_emb(codes)  # uses codes.shape[1]; already scaled by dim**-0.5
        x = self.emb_dropout(x)
        x = self.attn_layers(x, mask=mask)
        x = self.norm(x)
        return [head(x) for head in self.to_logits]


class RefDecoder(nn.Module):
    """``decoder`` (MMT's autoregressive wrapper), holding ``net``."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.net = RefNet(cfg)


class RefMMT(nn.Module):
    """``MusicXTransformer`` stand-in: ``model.decoder.net`` is the network."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.decoder = RefDecoder(cfg)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Six logits over every position."""
        return self.decoder.net(codes, mask)


def load_fixture_model(run: str, n_tokens: tuple[int, ...]) -> RefMMT:
    """Build a fixture run from its ``train-args.json`` and load its checkpoint strictly."""
    run_dir = FIXTURES / "models" / "bach" / run
    args = json.loads((run_dir / "train-args.json").read_text(encoding="utf-8"))
    cfg = RefConfig(
        dim=args["dim"],
        layers=args["layers"],
        heads=args["heads"],
        max_seq_len=args["max_seq_len"],
        n_tokens=n_tokens,
        abs_pos_emb=args.get("abs_pos_emb", True),
        rel_pos_emb=args.get("rel_pos_emb", False),
    )
    model = RefMMT(cfg)
    state = torch.load(
        run_dir / "checkpoints" / "best_model.pt", map_location="cpu", weights_only=True
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_fixtures(tol: float = FIXTURE_TOL) -> dict[str, float]:
    """Max abs logits difference on real positions per fixture run; raises if above ``tol``."""
    diffs: dict[str, float] = {}
    for run in FIXTURE_RUNS:
        ref = np.load(FIXTURES / "reference" / f"{run}.npz", allow_pickle=False)
        n_tokens = tuple(int(n) for n in ref["n_tokens"])
        model = load_fixture_model(run, n_tokens)
        seq = torch.from_numpy(ref["seq"])
        mask = torch.from_numpy(ref["mask"])
        with torch.inference_mode():
            logits = model(seq, mask)
        real = ref["mask"]
        diff = max(
            float(np.abs(lg.numpy()[real] - ref[f"logits_{i}"][real]).max())
            for i, lg in enumerate(logits)
        )
        diffs[run] = diff
        if not diff <= tol:
            raise AssertionError(
                f"x-transformers reference {run}: logits differ by {diff:.3g} > {tol}"
            )
    return diffs


if __name__ == "__main__":
    print(check_fixtures())
