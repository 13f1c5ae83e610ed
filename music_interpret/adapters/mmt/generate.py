"""MMT's decoding rules (``MusicAutoregressiveWrapper.generate``) for one sequence.

At each step the model sees the last ``max_seq_len`` codes. The event type is drawn
first: it may not go below the largest type so far and is never start-of-song. For an
instrument event only the instrument is drawn (code 0 excluded); for a note the five
fields are drawn in order, each excluding code 0, the monotonic fields (by default the
beat) not going below their largest code so far. Other events are all zeros apart from
the type. Every draw is x-transformers' ``top_k`` filter (keeping
``ceil((1 - filter_thres) * n)`` logits), softmax of the filtered logits divided by the
temperature, then ``torch.multinomial``, in the same order of calls as MMT, so a seeded
run reproduces MMT's samples. ``filter_thres=0.999`` keeps one logit: greedy decoding.

``patch=(hook point, fn)`` runs every step's forward pass with ``fn`` applied to the
activation at that hook point (at every position, prompt included), e.g. adding a
steering vector; ``generator`` draws from a ``torch.Generator`` instead of torch's
global random state (same samples as ``torch.manual_seed`` with the same seed on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .model import FIELDS, MMTModel, Patch
from .representation import EOS, INSTRUMENT, NOTE, SOS


def _draw(logits: torch.Tensor, thres: float, temperature: float,
          generator: torch.Generator | None = None) -> torch.Tensor:
    k = math.ceil((1 - thres) * logits.shape[-1])
    val, ind = torch.topk(logits, k)
    filtered = torch.full_like(logits, float("-inf")).scatter_(1, ind, val)
    probs = torch.softmax(filtered / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: MMTModel,
    prompt: torch.Tensor,
    steps: int,
    eos_token: int | None = EOS,
    temperature: float = 1.0,
    filter_thres: float = 0.9,
    monotonicity_dim: Sequence[str] = ("type", "beat"),
    patch: Patch | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (T0, 6) or (1, T0, 6) by up to ``steps`` codes.

    Returns only the new codes, (1, n, 6) int64; decoding stops after end-of-song.
    """
    out = prompt[None] if prompt.ndim == 2 else prompt
    if out.shape[0] != 1:
        raise ValueError("generate() follows MMT and supports batch size 1 only")
    start = out.shape[1]
    mono = [FIELDS.index(d) for d in monotonicity_dim]
    current = {d: int(out[0, :, d].max()) for d in mono}
    net, limit = model.net, model.cfg.max_seq_len
    for _ in range(steps):
        step_logits, _ = net.run(out[:, -limit:], patch=patch)
        assert step_logits is not None
        logits = [lg[0, -1:].clone() for lg in step_logits]
        if 0 in current:
            logits[0][0, : current[0]] = float("-inf")
        logits[0][0, SOS] = float("-inf")
        etype = _draw(logits[0], filter_thres, temperature, generator)[0]
        if 0 in current:
            current[0] = max(current[0], int(etype))
        row = torch.zeros(len(FIELDS), dtype=torch.long, device=out.device)
        row[0] = etype[0]
        if int(etype) == INSTRUMENT:
            logits[5][:, 0] = float("-inf")
            row[5] = _draw(logits[5], filter_thres, temperature, generator)[0, 0]
        elif int(etype) == NOTE:
            for d in range(1, len(FIELDS)):
                if d in current:
                    logits[d][0, : current[d]] = float("-inf")
                logits[d][:, 0] = float("-inf")
                row[d] = _draw(logits[d], filter_thres, temperature, generator)[0, 0]
                if d in current:
                    current[d] = max(current[d], int(row[d]))
        out = torch.cat((out, row[None, None]), dim=1)
        if eos_token is not None and int(row[0]) == eos_token:
            break
    return out[:, start:]
